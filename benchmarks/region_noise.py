"""How far from its stated coverage an exactly calibrated region map lands on a few hundred new photographers.

    python benchmarks/region_noise.py --index BUNDLE [--photos 3000] [--draws 200] [--group AUTHOR]

A query set of whole photographers is one draw: photos of one photographer share places and habits, so the
observed coverage of a few hundred photographers scatters far more than its photo count suggests. This draws
pseudo-query sets from the bundle's own held-out photographers the way `benchmarks/realistic.py` draws its
queries (whole photographers in a seeded order, each taken while the set stays within --photos), fits the
cells stage's map (`geo.stages.cells.stage.region_scores`, `conformal_map`) on the other held-out
photographers, and reports each stated coverage's observed mean, standard deviation and 2.5-97.5 % range over
the draws, and the share of draws whose 0.5 and 0.9 both land within 0.02.
"""
from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import numpy as np

from geo.core.splits import validation_mask
from geo.models.heads import head_logits
from geo.stages.cells.partition import locate, partitions_from_tables
from geo.stages.cells.predictor import CellPredictor
from geo.stages.cells.region import REPORT_COVERAGES, conformal_map, mass_threshold
from geo.stages.cells.stage import region_scores
from geo.store.bundle import open_bundle
from geo.store.embeddings import EmbeddingReader


def pseudo_sets(groups: np.ndarray, photos: int, draws: int) -> list[np.ndarray]:
    """Masks of whole photographers: each draw takes them in a seeded order while the set stays within
    ``photos`` (as `benchmarks/realistic.py` picks its queries)."""
    names, inv, counts = np.unique(groups, return_inverse=True, return_counts=True)
    out = []
    for d in range(draws):
        taken, chosen = 0, []
        for g in np.random.default_rng([d, 7]).permutation(len(names)):
            if taken + counts[g] <= photos:
                chosen.append(g)
                taken += counts[g]
            if taken >= photos:
                break
        out.append(np.isin(inv, chosen))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", required=True)
    ap.add_argument("--photos", type=int, default=3000, help="photos per pseudo-query set")
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--group", default="AUTHOR")
    a = ap.parse_args()
    b = open_bundle(a.index)
    pred = CellPredictor.load(b)
    meta, emb = EmbeddingReader(b).read()
    groups = meta[a.group].astype(str).to_numpy()
    val = np.flatnonzero(validation_mask(len(emb), groups, 0.2, 0))
    rows = locate(partitions_from_tables(pred.tables, pred.names), meta["lat"], meta["lon"])
    cells = SimpleNamespace(rows=rows, all_rows=rows, tables=pred.tables,
                            parts=[SimpleNamespace(name=n) for n in pred.names])
    logits, _ = head_logits(pred.model, emb[val], None)
    scores, top = region_scores(cells, logits, val, pred.parents, pred.calibration, groups)
    sets = pseudo_sets(groups[val], a.photos, a.draws)
    observed = np.array([[np.mean(scores[s] <= np.array([mass_threshold(c, cmap, t)[0] for t in top[s]]) + 1e-12)
                          for c in REPORT_COVERAGES] for s in sets
                         for cmap in [conformal_map(scores[~s], top[~s])]])
    for j, c in enumerate(REPORT_COVERAGES):
        print(json.dumps({"coverage": c, "mean": round(float(observed[:, j].mean()), 4),
                          "sd": round(float(observed[:, j].std()), 4),
                          "range95": np.percentile(observed[:, j], [2.5, 97.5]).round(4).tolist()}))
    both = (np.abs(observed[:, REPORT_COVERAGES.index(0.5)] - 0.5) <= 0.02) & \
           (np.abs(observed[:, REPORT_COVERAGES.index(0.9)] - 0.9) <= 0.02)
    print(f"{a.draws} sets of ~{a.photos} photos by {np.median([len(np.unique(groups[val][s])) for s in sets]):.0f} "
          f"photographers (median), each map fitted on the others of {len(np.unique(groups[val]))} held-out "
          f"photographers; both 0.5 and 0.9 within 0.02: {both.mean():.0%} of the sets")


if __name__ == "__main__":
    main()
