"""Region answers against the prior's region of the same coverage, on held-out photographers' queries.

    python benchmarks/region_coverage.py --index BUNDLE --queries queries.parquet [--group AUTHOR]

For each stated coverage: the share of queries whose truth lies inside their region (with a 95 % interval from
resampling whole photographers), the regions' median area, and the same for the gallery prior (every photo's
posterior the gallery's cell frequencies), calibrated the same way: split conformal on the bundle's held-out
photographers (`geo.stages.cells.stage._region_map` with the prior alone, alpha = 0).
"""
from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd

from geo.core.splits import validation_mask
from geo.query.index import open_index
from geo.stages.cells.partition import locate, partitions_from_tables
from geo.stages.cells.region import REPORT_COVERAGES, mass_threshold
from geo.stages.cells.stage import _region_map
from geo.store.embeddings import EmbeddingReader


def interval(hit: np.ndarray, groups: np.ndarray, draws: int = 2000) -> list[float]:
    """95 % interval of the hit rate, resampling whole photographers."""
    _, inv = np.unique(groups, return_inverse=True)
    n, h = np.bincount(inv), np.bincount(inv, weights=hit)
    pick = np.random.default_rng(0).integers(0, len(n), (draws, len(n)))
    return np.percentile(h[pick].sum(1) / n[pick].sum(1), [2.5, 97.5]).round(4).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", required=True)
    ap.add_argument("--queries", required=True)
    ap.add_argument("--group", default="AUTHOR")
    a = ap.parse_args()
    idx = open_index(a.index)
    pred = idx.cells
    if not pred.calibration.get("region"):
        raise SystemExit(f"{a.index}: built before region maps; rebuild its cells (--force cells)")
    q = pd.read_parquet(a.queries)
    parts = partitions_from_tables(pred.tables, pred.names)
    truth = locate(parts, q["lat"], q["lon"])
    rc = pred.region_cells
    probs = pred.fine_probs(np.stack(q["embedding"].to_numpy()).astype(np.float32))
    scores = rc.scores(probs, truth)
    # the prior, calibrated on the same held-out photographers
    meta, _ = EmbeddingReader(idx.bundle).read()
    val = np.flatnonzero(validation_mask(len(meta), meta[a.group].astype(str).to_numpy(), 0.2, 0))
    rows = locate(parts, meta["lat"], meta["lon"])
    cells = SimpleNamespace(rows=rows, all_rows=rows, tables=pred.tables,
                            parts=[SimpleNamespace(name=n) for n in pred.names])
    flat = [np.zeros((len(val), len(t))) for t in pred.tables]
    prior_map = _region_map(cells, flat, val, pred.parents, {**pred.calibration, "alpha": 0.0},
                            meta[a.group].astype(str).to_numpy())
    prior_map = {k: prior_map[k] for k in ("coverage", "mass", "photos")}  # one region for every photo: no bins
    prior = np.exp(pred.priors[-1])
    prior_scores = rc.scores(np.tile(prior, (len(q), 1)), truth)
    groups = q[a.group].astype(str).to_numpy()
    out = []
    for c in REPORT_COVERAGES:
        t = np.array([mass_threshold(c, pred.calibration["region"], top)[0] for top in probs.max(axis=1)])
        pt, _ = mass_threshold(c, prior_map)
        hit, prior_hit = scores <= t + 1e-12, prior_scores <= pt + 1e-12
        area = float(np.median([rc.region(p, c, pred.calibration["region"]).area_km2 for p in probs]))
        prior_area = rc.region(prior, c, prior_map).area_km2
        out.append({"coverage": c, "observed": round(float(hit.mean()), 4), "ci95": interval(hit, groups),
                    "median_area_km2": round(area), "prior_observed": round(float(prior_hit.mean()), 4),
                    "prior_area_km2": round(prior_area), "area_vs_prior": round(area / prior_area, 3)})
        print(json.dumps(out[-1]), flush=True)
    quintile = np.searchsorted(np.quantile(probs.max(axis=1), [0.2, 0.4, 0.6, 0.8]), probs.max(axis=1), side="right")
    for c in (0.5, 0.9):  # conditional coverage: by fifths of the queries' confidence (top-cell mass), least first
        hit = scores <= np.array([mass_threshold(c, pred.calibration["region"], p.max())[0] for p in probs]) + 1e-12
        print(json.dumps({"coverage": c, "observed_by_confidence_fifth": [round(float(hit[quintile == k].mean()), 3)
                                                                          for k in range(5)]}))
    print(f"queries: {len(q)} by {len(set(groups))} photographers; in no fine cell: {(truth[:, -1] < 0).mean():.1%}; "
          f"map fitted on {pred.calibration['region']['photos']} held-out photos")


if __name__ == "__main__":
    main()
