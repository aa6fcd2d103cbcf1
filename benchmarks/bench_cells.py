"""Cell priors benchmarks: assignment throughput, head training time, and the photographer-split dev evaluation.

    python benchmarks/bench_cells.py throughput [--points 2000000]
    python benchmarks/bench_cells.py train-time [--n 100000 --dim 512]
    python benchmarks/bench_cells.py decide [--queries 200]   (the `--mode cells` decision on MP-16's partitions)
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

from geo.core import s2  # noqa: E402
from geo.core.geodesy import THRESHOLDS_KM as THRESHOLDS  # noqa: E402
from geo.core.geodesy import haversine_km, latlon_to_xyz, pairwise_haversine_km  # noqa: E402
from geo.core.priors import population_prior  # noqa: E402
from geo.core.splits import group_folds  # noqa: E402
from geo.models.heads import CellHeads, head_logits  # noqa: E402
from geo.stages.cells import partition as P  # noqa: E402
from geo.stages.cells.calibration import fine_log_posterior, log_priors  # noqa: E402
from geo.stages.cells.stage import CellsConfig, fit_cells  # noqa: E402
from geo.stages.cells.support import SupportDecision, support_points  # noqa: E402
from geo.store.bundle import open_bundle  # noqa: E402
from geo.store.embeddings import EmbeddingReader  # noqa: E402


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


def synthetic_gallery(n: int, dim: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """n photos at YFCC26k locations (jittered ~50 km) with their authors; unit features tied to location."""
    rng = np.random.default_rng(seed)
    yfcc = pd.read_csv(Path(__file__).resolve().parents[2] / "shared/data/yfcc/yfcc25600_places365.csv")
    pick = rng.integers(0, len(yfcc), n)
    lat = np.clip(yfcc["LAT"].to_numpy()[pick] + rng.normal(0, 0.5, n), -89.9, 89.9)
    lon = (yfcc["LON"].to_numpy()[pick] + rng.normal(0, 0.5, n) + 180) % 360 - 180
    proj = rng.normal(size=(3, dim)).astype(np.float32)
    emb = (latlon_to_xyz(lat, lon).astype(np.float32) * 4) @ proj + rng.normal(size=(n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return pd.DataFrame({"lat": lat, "lon": lon, "AUTHOR": yfcc["AUTHOR"].to_numpy()[pick]}), emb


def train_time(n: int, dim: int, seed: int = 0) -> dict:
    """fit_cells on n synthetic embeddings (:func:`synthetic_gallery`)."""
    meta, emb = synthetic_gallery(n, dim, seed)
    t0 = time.perf_counter()
    fitted = fit_cells(meta, emb, CellsConfig(seed=seed))  # the CellPredictor; .info is the stage's record
    return {"n": n, "dim": dim, "seconds_total": time.perf_counter() - t0, "seconds_heads": fitted.info["train"]["seconds"],
            "epochs": fitted.info["train"]["epochs_run"], "cells": fitted.info["cells"]}


def decide_latency(queries: int, dim: int = 512, seed: int = 0) -> dict:
    """`--mode cells` cost on MP-16's published partitions, per query: heads + f* (the bare baseline) vs the
    spot decision that follows. Photos: the YFCC26k coordinates; cells without any keep their published mean."""
    root = Path(__file__).resolve().parents[2] / "shared/data"
    parts = P.read_partitions(sorted((root / "geoestimation/geo-cells").glob("cells_50_*.csv")))
    yfcc = pd.read_csv(root / "yfcc/yfcc25600_places365.csv")
    lat, lon = yfcc["LAT"].to_numpy(float), yfcc["LON"].to_numpy(float)
    leaf = s2.leaf_ids(lat, lon)
    parents = P.link_parents(parts)
    rows = [P.assign(leaf, p.cell_ids) for p in parts]
    fine_table = pd.DataFrame({"lat": parts[-1].fallback_lat, "lon": parts[-1].fallback_lon})
    support = support_points(lat, lon, rows[-1], fine_table)
    decision = SupportDecision(support, fine_table["lat"].to_numpy(), fine_table["lon"].to_numpy())
    heads = CellHeads(dim, [len(p.cell_ids) for p in parts]).eval()
    priors = log_priors([np.bincount(r[r >= 0], minlength=len(p.cell_ids)).astype(float) for r, p in zip(rows, parts)])
    parent_rows = [parents[parts[-1].name][p.name] for p in parts[:-1]]
    emb = np.random.default_rng(seed).normal(size=(queries, dim)).astype(np.float32)
    decision.decide(np.full((1, len(fine_table)), 1 / len(fine_table)))  # builds the cell-neighbour matrix once
    t_post = t_dec = 0.0
    for e in emb:
        t0 = time.perf_counter()
        logits, _ = head_logits(heads, e[None])
        fine = np.exp(fine_log_posterior(logits, priors, [1.0] * len(parts), 0.5, parent_rows))
        t1 = time.perf_counter()
        decision.decide(fine)
        t_post, t_dec = t_post + t1 - t0, t_dec + time.perf_counter() - t1
    return {"fine_cells": len(fine_table), "support_spots": len(support), "queries": queries,
            "posterior_ms": 1e3 * t_post / queries, "decision_ms": 1e3 * t_dec / queries,
            "decision_over_posterior": t_dec / t_post}


# ------------------------------------------------------------ dev evaluation
def accuracy(d_km: np.ndarray) -> dict[int, float]:
    return {t: float(np.mean(d_km <= t) * 100) for t in THRESHOLDS}


def cell_mean_decision(pred, fine_p: np.ndarray, radius_km: float) -> tuple[np.ndarray, np.ndarray]:
    """The earlier rule, for comparison: the fine-cell mean with most posterior mass within radius_km."""
    t = pred.tables[-1]
    clat, clon = t["lat"].to_numpy(), t["lon"].to_numpy()
    near = pairwise_haversine_km(clat, clon, clat, clon) <= radius_km
    best = (fine_p @ near.T).argmax(1)
    return clat[best], clon[best]


RULES = {
    "population prior": "best constant guess: the gallery photo with most gallery photos within 750 km",
    "arg-max, uncalibrated heads, finest only": "T=1, no prior",
    "arg-max, calibrated heads, finest only": "fitted T, alpha 1 (heads only)",
    "arg-max, calibrated heads, f*": "fitted T, alpha 1",
    "spot decision, calibrated heads, finest only": "fitted T, alpha 1",
    "spot decision, calibrated heads, f*": "fitted T, alpha 1",
    "cell mean with most mass within 750 km, f*": "fitted T and alpha: the previous `--mode cells` rule",
    "spot decision, f* (`--mode cells`)": "fitted T and alpha",
    "spot decision, prior only": "alpha 0: the same decision on the gallery prior alone",
    "coordinate regression (`--mode regression`)": "ridge onto unit vectors, weighted against the prior on held-out photographers",
}


def evaluate(meta: pd.DataFrame, emb: np.ndarray, config: CellsConfig, group_column: str = "AUTHOR",
             folds: int = 5, seed: int = 0) -> tuple[pd.DataFrame, list[dict]]:
    """Grouped k-fold: each fold's photographers are queries against a gallery of all the others.

    Returns (accuracy (%) at THRESHOLDS per answer rule over all photos, each fold's calibration).
    "Spot decision": the photo spot with most posterior mass within 750 km, then 200, then 25 km.
    """
    lat, lon = meta["lat"].to_numpy(float), meta["lon"].to_numpy(float)
    fold = group_folds(len(meta), meta[group_column].astype(str).to_numpy(), folds, seed)
    dist = {r: np.zeros(len(meta)) for r in RULES}
    calibrations = []
    for f in range(folds):
        g, q = fold != f, fold == f
        pl, po = population_prior(lat[g], lon[g])
        dist["population prior"][q] = haversine_km(lat[q], lon[q], pl, po)
        pred = fit_cells(meta.loc[g].reset_index(drop=True), emb[g], config, log=lambda *_: None)
        calib = pred.calibration
        calibrations.append({**calib, "city_head": pred.info.get("city_head")})  # printed per fold
        fine_tab = pred.tables[-1]
        clat, clon = fine_tab["lat"].to_numpy(), fine_tab["lon"].to_numpy()
        scene = meta.loc[q, config.scene_column].to_numpy() if config.scene_column else None

        def put(rule, la, lo):
            dist[rule][q] = haversine_km(lat[q], lon[q], la, lo)

        def fine_probs(alpha, hierarchy=True, temperature=None):
            pred.calibration = {**calib, "alpha": alpha, "temperature": temperature or calib["temperature"]}
            _, lp = pred.log_probs(emb[q], scene, hierarchy=hierarchy)
            pred.calibration = calib
            return np.exp(lp)

        p = fine_probs(1.0, False, [1.0] * len(pred.names))
        put("arg-max, uncalibrated heads, finest only", clat[p.argmax(1)], clon[p.argmax(1)])
        for hier, tag in ((False, "finest only"), (True, "f*")):
            p = fine_probs(1.0, hier)
            put(f"arg-max, calibrated heads, {tag}", clat[p.argmax(1)], clon[p.argmax(1)])
            put(f"spot decision, calibrated heads, {tag}", *pred.decide(p)[:2])
        p = fine_probs(calib["alpha"])
        put("cell mean with most mass within 750 km, f*", *cell_mean_decision(pred, p, 750.0))
        put("spot decision, f* (`--mode cells`)", *pred.decide(p)[:2])
        put("spot decision, prior only", *pred.decide(fine_probs(0.0))[:2])
        put("coordinate regression (`--mode regression`)", *pred.regression.predict(emb[q]))
    table = pd.DataFrame({r: {**accuracy(d), "median km": float(np.median(d))} for r, d in dist.items()}).T
    return table.rename(columns=lambda t: f"{t} km" if isinstance(t, int) else t), calibrations


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("throughput")
    a.add_argument("--points", type=int, default=2_000_000)
    a = sub.add_parser("train-time")
    a.add_argument("--n", type=int, default=100_000)
    a.add_argument("--dim", type=int, default=512)
    a = sub.add_parser("decide")
    a.add_argument("--queries", type=int, default=200)
    a = sub.add_parser("dev")
    a.add_argument("--bundle", required=True, help="a `geo build-index` bundle: its embeddings and metadata")
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
    elif args.cmd == "decide":
        print(decide_latency(args.queries))
    else:
        meta, emb = EmbeddingReader(open_bundle(args.bundle)).read()
        cfg = CellsConfig(partitioner=args.partitioner, tau_min=args.tau_min, tau_max=args.tau_max, head=args.head,
                          smoothing_km=args.smoothing_km, scene_column=args.scene_column, seed=args.seed)
        t0 = time.perf_counter()
        table, calibrations = evaluate(meta, emb, cfg, folds=args.folds, seed=args.seed)
        print(f"{len(meta)} photos, {args.folds} photographer folds (seed {args.seed}), {time.perf_counter() - t0:.0f}s")
        for f, c in enumerate(calibrations):
            city = c["city_head"] or {}
            print(f"  fold {f}: alpha {c['alpha']:.2f}, T {[round(t, 2) for t in c['temperature']]}, "
                  f"{c['val_photos']} photos from {c['source']}"
                  + (f"; city head {city['cities']} cities, held-out top-1 {city['held_out_acc']:.1%} against the "
                     f"majority class's {city['majority_acc']:.1%} ({city['held_out_in_a_city']} of "
                     f"{city['held_out']} held-out photos in one of its cities)" if "held_out_acc" in city else ""))
        print(table.round(1).to_markdown() if _has_tabulate() else table.round(1).to_string())


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    main()
