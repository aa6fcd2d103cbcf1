"""Adaptive S2 cells against semantic geocells (PIGEON) on YFCC26k's real places and photographers.

    python benchmarks/bench_partitioners.py [--folds 3 --dim 64]
    python benchmarks/bench_partitioners.py --scale 100000 300000 1000000   (partitioning time only)

Two parts, both with the default tau_min / tau_max for the gallery's size:

* **Structure** on all 25,600 coordinates: cells per partition, time to partition, the share of fine
  cells whose photos on land lie in more than one country, and the *oracle*: every photo answered with
  its own fine cell's Class2GPS mean, the best a perfect classifier over that partition can do (accuracy
  at 1/25/200/750/2500 km and the share answered in the right country).
* **Learned**: photographer folds (whole AUTHORs held out; 1,000 of each fold's photos answered); the
  cells stage fitted on the others
  (`fit_cells`: partitions, heads, calibration) and `--mode cells`'s decision for the held-out photos.
  Embeddings are synthetic, because YFCC26k ships no images, in two worlds:

  - ``grid``: a random direction per S2 cell at levels 2, 5 and 9 (what benchmarks/bench_scale.py uses);
    content changes exactly at S2 cell borders, the world S2 partitions are made for;
  - ``borders``: a direction per country (language, signs, architecture) plus smooth random Fourier
    features of the position at ~1,500 and ~150 km; content changes at borders and gradually inside.

  Both add a photographer's style and noise. Neither world is the real one; the two bracket it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geo.core import s2  # noqa: E402
from geo.core.geodesy import THRESHOLDS_KM, EARTH_RADIUS_KM, haversine_km, latlon_to_xyz  # noqa: E402
from geo.core.priors import population_prior  # noqa: E402
from geo.core.splits import group_folds  # noqa: E402
from geo.data.countries import country_index  # noqa: E402
from geo.stages.cells import partition as P  # noqa: E402
from geo.stages.cells.stage import CellsConfig, fit_cells  # noqa: E402

YFCC = Path(__file__).resolve().parents[2] / "shared" / "data" / "yfcc" / "yfcc25600_places365.csv"
PARTITIONERS = ("adaptive", "semantic")
EPOCHS = 20  # the same head-training budget for both partitioners; the stage's default 100 takes 5 min a fit here


def _unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _rff(xyz: np.ndarray, scale_km: float, dim: int, seed: int) -> np.ndarray:
    """Random Fourier features of unit vectors: similar within about scale_km, unit norm on average."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((3, dim)) * (EARTH_RADIUS_KM / scale_km)
    b = rng.uniform(0, 2 * np.pi, dim)
    return (np.sqrt(2.0 / dim) * np.cos(xyz @ w + b)).astype(np.float32)


def embeddings(world: str, lat: np.ndarray, lon: np.ndarray, author: np.ndarray, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = len(lat)
    if world == "grid":
        leaf = s2.leaf_ids(lat, lon)
        emb = np.zeros((n, dim), np.float32)
        for level, w in zip((2, 5, 9), (1.0, 0.8, 0.6)):
            uniq, inv = np.unique(s2.parent_ids(leaf, level), return_inverse=True)
            emb += w * _unit_rows(np.random.default_rng([seed, level]), len(uniq), dim)[inv]
    else:
        c = country_index(lat, lon)
        uniq, inv = np.unique(c, return_inverse=True)
        emb = 1.0 * _unit_rows(np.random.default_rng([seed, 1]), len(uniq), dim)[inv]
        xyz = latlon_to_xyz(lat, lon)
        emb += 0.8 * _rff(xyz, 1500.0, dim, seed + 2) + 0.6 * _rff(xyz, 150.0, dim, seed + 3)
    styles = _unit_rows(np.random.default_rng([seed, 99]), 4096, dim) * 0.5
    emb += styles[np.unique(author, return_inverse=True)[1] % len(styles)]
    emb += rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def scores(lat, lon, p_lat, p_lon, true_country) -> dict[str, float]:
    d = haversine_km(lat, lon, p_lat, p_lon)
    out = {f"{t} km": float(np.mean(d <= t) * 100) for t in THRESHOLDS_KM}
    out["country"] = float(np.mean(country_index(p_lat, p_lon) == true_country) * 100)
    out["median km"] = float(np.median(d))
    return out


def structure(lat, lon, country) -> pd.DataFrame:
    tau_min, tau_max = P.default_taus(len(lat))
    rows = []
    for name in PARTITIONERS:
        t0 = time.perf_counter()
        parts = P.build_partitions(lat, lon, tau_min, tau_max, name)
        seconds = time.perf_counter() - t0
        located = P.locate(parts, lat, lon)
        fine = located[:, -1]
        table = P.cell_table(parts[-1], fine, lat, lon, {}, {})
        inside = fine >= 0
        on_land = inside & (country >= 0)
        straddle = [len(np.unique(country[on_land & (fine == r)])) > 1 for r in np.unique(fine[on_land])]
        p_lat, p_lon = table["lat"].to_numpy()[np.maximum(fine, 0)], table["lon"].to_numpy()[np.maximum(fine, 0)]
        oracle = scores(lat[inside], lon[inside], p_lat[inside], p_lon[inside], country[inside])
        rows.append({"partitioner": name, "cells (coarse/middle/fine)": "/".join(str(p.n_cells) for p in parts),
                     "seconds": round(seconds, 1), "photos in a fine cell %": round(inside.mean() * 100, 1),
                     "fine cells across a border %": round(float(np.mean(straddle)) * 100, 1),
                     **{f"oracle {k}": round(v, 1) for k, v in oracle.items()}})
    return pd.DataFrame(rows).set_index("partitioner")


def learned(meta: pd.DataFrame, country: np.ndarray, dim: int, folds: int, seed: int, queries: int) -> pd.DataFrame:
    """Each fold's held-out photographers answered by `--mode cells` (a seeded sample of ``queries`` of their
    photos per fold: the decision, not the fit, dominates the time), and the population prior."""
    lat, lon = meta["lat"].to_numpy(float), meta["lon"].to_numpy(float)
    fold = group_folds(len(meta), meta["AUTHOR"].astype(str).to_numpy(), folds, seed)
    asked = np.zeros(len(meta), bool)
    for f in range(folds):
        mine = np.flatnonzero(fold == f)
        asked[np.random.default_rng(seed + f).choice(mine, min(queries, len(mine)), replace=False)] = True
    rows = []
    for world in ("grid", "borders"):
        emb = embeddings(world, lat, lon, meta["AUTHOR"].astype(str).to_numpy(), dim, seed)
        pred = {k: np.zeros((len(meta), 2)) for k in (*PARTITIONERS, "prior")}
        for f in range(folds):
            q, g = (fold == f) & asked, fold != f
            pred["prior"][q] = population_prior(lat[g], lon[g])
            for name in PARTITIONERS:
                config = CellsConfig(partitioner=name, seed=seed, max_epochs=EPOCHS, answer_heads=False)
                cells = fit_cells(meta.loc[g].reset_index(drop=True), emb[g], config, log=lambda *_: None)
                la, lo, _ = cells.decide(cells.fine_probs(emb[q]))
                pred[name][q] = np.stack([la, lo], 1)
                print(f"  {world} fold {f} {name}: {cells.info['cells']} alpha {cells.calibration['alpha']:.2f}",
                      flush=True)
        for k, p in pred.items():
            rows.append({"world": world, "answer": "population prior" if k == "prior" else f"--mode cells, {k}",
                         **{m: round(v, 1) for m, v in scores(lat[asked], lon[asked], p[asked, 0], p[asked, 1],
                                                             country[asked]).items()}})
    return pd.DataFrame(rows).set_index(["world", "answer"])


def scale(sizes: list[int], seed: int) -> pd.DataFrame:
    """Partitioning time at larger galleries: YFCC26k's coordinates replicated with ~3 km of jitter."""
    base = pd.read_csv(YFCC, usecols=["LAT", "LON"])
    rows = []
    for n in sizes:
        rng = np.random.default_rng(seed)
        pick = rng.integers(0, len(base), n)
        lat = np.clip(base["LAT"].to_numpy()[pick] + rng.normal(0, 0.03, n), -89.9, 89.9)
        lon = (base["LON"].to_numpy()[pick] + rng.normal(0, 0.03, n) + 180) % 360 - 180
        tau_min, tau_max = P.default_taus(n)
        for name in PARTITIONERS:
            t0 = time.perf_counter()
            parts = P.build_partitions(lat, lon, tau_min, tau_max, name, seed=seed)
            built = time.perf_counter() - t0
            t0 = time.perf_counter()
            P.locate(parts, lat, lon)
            rows.append({"photos": n, "partitioner": name, "taus": f"{tau_min} / {'/'.join(map(str, tau_max))}",
                         "cells": "/".join(str(p.n_cells) for p in parts), "partition s": round(built, 1),
                         "locate every photo s": round(time.perf_counter() - t0, 1)})
            print(rows[-1], flush=True)
    return pd.DataFrame(rows).set_index(["photos", "partitioner"])


def markdown(df: pd.DataFrame) -> str:
    """A markdown table (pandas' needs tabulate, which geo does not install)."""
    df = df.reset_index()
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "---|" * len(df.columns)
    return "\n".join([head, rule, *("| " + " | ".join(map(str, r)) + " |" for r in df.itertuples(index=False))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--queries", type=int, default=1000, help="held-out photos answered per fold")
    ap.add_argument("--scale", type=int, nargs="*", help="only time partitioning at these gallery sizes")
    args = ap.parse_args()
    if args.scale:
        print(markdown(scale(args.scale, args.seed)))
        print(f"load average {os.getloadavg()[0]:.1f}")
        return
    meta = pd.read_csv(YFCC, usecols=["AUTHOR", "LAT", "LON"]).rename(columns={"LAT": "lat", "LON": "lon"})
    lat, lon = meta["lat"].to_numpy(float), meta["lon"].to_numpy(float)
    country = country_index(lat, lon)
    t0 = time.perf_counter()
    print(markdown(structure(lat, lon, country)), flush=True)
    print()
    print(markdown(learned(meta, country, args.dim, args.folds, args.seed, args.queries)))
    print(f"\n{len(meta):,} photos, {args.folds} photographer folds ({args.queries} queries each), dim {args.dim}, "
          f"seed {args.seed}: {time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
