"""Cell priors benchmarks: assignment throughput, head training time, and the photographer-split dev evaluation.

    python benchmarks/bench_cells.py throughput [--points 2000000]
    python benchmarks/bench_cells.py train-time [--n 100000 --dim 512]
    python benchmarks/bench_cells.py dev --npz /tmp/geo-dev/im2gps3k_effnet.npz [--folds 5]
    python benchmarks/bench_cells.py dev --bundle INDEX_DIR   (after `geo build-index`: same protocol on its embeddings)

``evaluate(meta, emb, config)`` is the callable form: meta needs lat, lon and a group column.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geo.cells import partition as P  # noqa: E402
from geo.cells import s2  # noqa: E402
from geo.cells.stage import CellsConfig, fit_cells  # noqa: E402
from geo.geodesy import haversine_km, pairwise_haversine_km  # noqa: E402

THRESHOLDS = (1, 25, 200, 750, 2500)


def throughput(points: int, seed: int = 0) -> dict:
    """Leaf ids + assignment to three MP-16-sized partitions (the published ones), points per second."""
    rng = np.random.default_rng(seed)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, points)))
    lon = rng.uniform(-180, 180, points)
    cells = sorted(Path(__file__).resolve().parents[2].glob("shared/data/geoestimation/geo-cells/cells_50_*.csv"))
    parts = P.read_partitions(cells) if cells else P.build_partitions(lat[:200_000], lon[:200_000], 5, [500, 200, 100])
    t0 = time.perf_counter()
    leaf = s2.leaf_ids(lat, lon)
    t1 = time.perf_counter()
    for p in parts:
        P.assign(leaf, p.cell_ids)
    t2 = time.perf_counter()
    t3 = time.perf_counter()
    built = P.build_partitions(lat, lon, 50, [5000, 2000, 1000])
    t4 = time.perf_counter()
    return {"points": points, "leaf_ids_per_s": points / (t1 - t0),
            "assign_3_partitions_per_s": points / (t2 - t1), "leaf_plus_assign_per_s": points / (t2 - t0),
            "build_3_adaptive_per_s": points / (t4 - t3), "built_cells": [len(p.cell_ids) for p in built]}


def train_time(n: int, dim: int, seed: int = 0) -> dict:
    """fit_cells on n synthetic embeddings: locations from YFCC26k (jittered), features tied to location."""
    rng = np.random.default_rng(seed)
    yfcc = pd.read_csv(Path(__file__).resolve().parents[2] / "shared/data/yfcc/yfcc25600_places365.csv")
    pick = rng.integers(0, len(yfcc), n)
    lat = np.clip(yfcc["LAT"].to_numpy()[pick] + rng.normal(0, 0.5, n), -89.9, 89.9)
    lon = (yfcc["LON"].to_numpy()[pick] + rng.normal(0, 0.5, n) + 180) % 360 - 180
    proj = rng.normal(size=(3, dim)).astype(np.float32)
    from geo.geodesy import latlon_to_xyz

    emb = (latlon_to_xyz(lat, lon).astype(np.float32) * 4) @ proj + rng.normal(size=(n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    meta = pd.DataFrame({"lat": lat, "lon": lon, "AUTHOR": yfcc["AUTHOR"].to_numpy()[pick]})
    t0 = time.perf_counter()
    fitted = fit_cells(meta, emb, CellsConfig(seed=seed))
    return {"n": n, "dim": dim, "seconds_total": time.perf_counter() - t0, "seconds_heads": fitted.info["train"]["seconds"],
            "epochs": fitted.info["train"]["epochs_run"], "cells": fitted.info["cells"]}


# ------------------------------------------------------------ dev evaluation
def population_prior(lat: np.ndarray, lon: np.ndarray, radius_km: float = 750.0) -> tuple[float, float]:
    """The gallery photo location with the most gallery photos within radius_km: the best constant guess."""
    d = pairwise_haversine_km(lat, lon, lat, lon)
    i = int(np.argmax((d <= radius_km).sum(1)))
    return float(lat[i]), float(lon[i])


def accuracy(d_km: np.ndarray) -> dict[int, float]:
    return {t: float(np.mean(d_km <= t) * 100) for t in THRESHOLDS}


def group_folds(groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number per photo; whole groups (photographers) per fold, balanced by photo count."""
    uniq, inv = np.unique(groups.astype(str), return_inverse=True)
    sizes = np.bincount(inv)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    order = order[np.argsort(-sizes[order], kind="stable")]
    load, fold_of = np.zeros(folds), np.zeros(len(uniq), dtype=int)
    for g in order:
        f = int(np.argmin(load))
        fold_of[g], load[f] = f, load[f] + sizes[g]
    return fold_of[inv]


def evaluate(meta: pd.DataFrame, emb: np.ndarray, config: CellsConfig, group_column: str = "AUTHOR",
             folds: int = 5, seed: int = 0, decide_km: float = 750.0) -> pd.DataFrame:
    """Grouped k-fold: each fold's photographers are queries against a gallery of all the others.

    Rows: answer rules; columns: accuracy (%) at THRESHOLDS over all photos.
    """
    lat, lon = meta["lat"].to_numpy(float), meta["lon"].to_numpy(float)
    fold = group_folds(meta[group_column].to_numpy(), folds, seed)
    rules = ["population prior", "arg-max, uncalibrated, finest only", "arg-max, finest only", "arg-max, f*",
             f"mass within {decide_km:g} km, f*", "mass within the threshold, finest only", "mass within the threshold, f*"]
    dist = {r: np.zeros(len(meta)) for r in rules}
    per_threshold = {r: {t: np.zeros(len(meta), dtype=bool) for t in THRESHOLDS} for r in rules[-2:]}
    for f in range(folds):
        g, q = fold != f, fold == f
        pl, po = population_prior(lat[g], lon[g])
        dist["population prior"][q] = haversine_km(lat[q], lon[q], pl, po)
        fitted = fit_cells(meta.loc[g].reset_index(drop=True), emb[g], config, log=lambda *_: None)
        pred = fitted.predictor
        fine_tab = pred.tables[-1]
        clat, clon = fine_tab["lat"].to_numpy(), fine_tab["lon"].to_numpy()
        scene = meta.loc[q, config.scene_column].to_numpy() if config.scene_column else None
        for rule, hier in (("arg-max, finest only", False), ("arg-max, f*", True)):
            _, lp = pred.log_probs(emb[q], scene, hierarchy=hier)
            b = lp.argmax(1)
            dist[rule][q] = haversine_km(lat[q], lon[q], clat[b], clon[b])
            fine_p = np.exp(lp)
            tag = "f*" if hier else "finest only"
            for t in THRESHOLDS:
                dl, dn, _ = pred.decide(fine_p, t)
                per_threshold[f"mass within the threshold, {tag}"][t][q] = haversine_km(lat[q], lon[q], dl, dn) <= t
            if hier:
                dl, dn, _ = pred.decide(fine_p, decide_km)
                dist[f"mass within {decide_km:g} km, f*"][q] = haversine_km(lat[q], lon[q], dl, dn)
        calib = pred.calibration
        pred.calibration = {**calib, "temperature": [1.0] * len(pred.names), "alpha": 1.0}
        _, lp = pred.log_probs(emb[q], scene, hierarchy=False)
        pred.calibration = calib
        b = lp.argmax(1)
        dist["arg-max, uncalibrated, finest only"][q] = haversine_km(lat[q], lon[q], clat[b], clon[b])
    out = {r: accuracy(dist[r]) for r in rules[:-2]}
    out.update({r: {t: float(per_threshold[r][t].mean() * 100) for t in THRESHOLDS} for r in rules[-2:]})
    return pd.DataFrame(out).T.rename(columns=lambda t: f"{t} km")


def load_npz(path: str) -> tuple[pd.DataFrame, np.ndarray]:
    d = np.load(path, allow_pickle=True)
    meta = pd.DataFrame({"id": d["ids"], "lat": d["lat"], "lon": d["lon"], "AUTHOR": d["author"], "S3_Label": d["s3"]})
    return meta, d["emb"].astype(np.float32)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("throughput")
    a.add_argument("--points", type=int, default=2_000_000)
    a = sub.add_parser("train-time")
    a.add_argument("--n", type=int, default=100_000)
    a.add_argument("--dim", type=int, default=512)
    a = sub.add_parser("dev")
    a.add_argument("--npz")
    a.add_argument("--bundle")
    a.add_argument("--folds", type=int, default=5)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--partitioner", default="adaptive")
    a.add_argument("--tau-min", type=int)
    a.add_argument("--tau-max", type=int, nargs="*", default=[])
    a.add_argument("--head", default="linear")
    a.add_argument("--smoothing-km", type=float, default=0.0)
    a.add_argument("--scene-column")
    args = ap.parse_args(argv)
    if args.cmd == "throughput":
        print(throughput(args.points))
    elif args.cmd == "train-time":
        print(train_time(args.n, args.dim))
    else:
        if args.bundle:
            from geo.bundle import open_bundle

            meta, emb = open_bundle(args.bundle).read_embeddings()
        elif args.npz:
            meta, emb = load_npz(args.npz)
        else:
            ap.error("dev needs --npz or --bundle")
        cfg = CellsConfig(partitioner=args.partitioner, tau_min=args.tau_min, tau_max=args.tau_max, head=args.head,
                          smoothing_km=args.smoothing_km, scene_column=args.scene_column, seed=args.seed)
        t0 = time.perf_counter()
        table = evaluate(meta, emb, cfg, folds=args.folds, seed=args.seed)
        print(f"{len(meta)} photos, {args.folds} photographer folds, {time.perf_counter() - t0:.0f}s")
        print(table.round(1).to_markdown() if _has_tabulate() else table.round(1).to_string())


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    main()
