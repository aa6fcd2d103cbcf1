"""What any method can reach on a realistic.py query set: every mode split by the generator's own truth.

    geo bench custom --index B --embeddings Q/queries.parquet --mode all --no-ci --out preds.parquet
    python benchmarks/realistic_ceiling.py --preds preds.parquet --queries Q/queries.parquet \
        --gallery Q/gallery.parquet

``benchmarks/realistic.py`` gives a quarter of its photos no location signal at all (its ``signal``
column says which): their embedding is scene, photographer style and noise. For them no method can beat
the best constant answer by much, so a mode that already answers nearly every photo *with* signal
correctly at a threshold leaves room only there. This prints each mode's accuracy on photos with and
without signal, and an upper bound for the set: 100 % of the photos with signal plus, for those without,
the best single point chosen on those very photos (in-sample, so optimistic), per threshold.
"""
from __future__ import annotations

import argparse

import numpy as np
import pyarrow.parquet as pq

from geo.core.geodesy import THRESHOLDS_KM, haversine_km


def best_constant(truth: np.ndarray, candidates: np.ndarray) -> dict[int, float]:
    """Per threshold, the largest share of ``truth`` within it of any one of ``candidates`` (in-sample)."""
    km = haversine_km(candidates[:, None, 0], candidates[:, None, 1], truth[None, :, 0], truth[None, :, 1])
    return {t: float((km <= t).mean(axis=1).max()) for t in THRESHOLDS_KM}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preds", required=True, help="geo bench --out of the queries (any modes)")
    ap.add_argument("--queries", required=True, help="realistic.py's queries.parquet (has the signal column)")
    ap.add_argument("--gallery", required=True, help="realistic.py's gallery.parquet: where constant answers may lie")
    ap.add_argument("--candidates", type=int, default=4000, help="gallery places tried as the constant answer")
    a = ap.parse_args()
    preds = pq.read_table(a.preds, columns=["query_id", "mode", "error_km"]).to_pandas()
    queries = pq.read_table(a.queries, columns=["id", "lat", "lon", "signal"]).to_pandas().set_index("id")
    preds["signal"] = queries.loc[preds["query_id"], "signal"].to_numpy()
    head = " | ".join(f"{t} km" for t in THRESHOLDS_KM)
    print(f"| mode | photos | {head} |\n|---|---|" + "---|" * len(THRESHOLDS_KM))
    for (mode, signal), d in preds.groupby(["mode", "signal"]):
        acc = " | ".join(f"{100 * np.mean(d['error_km'] <= t):.1f}" for t in THRESHOLDS_KM)
        print(f"| {mode} | {'with' if signal else 'without'} signal ({len(d):,}) | {acc} |")
    gallery = pq.read_table(a.gallery, columns=["lat", "lon"]).to_pandas()[["lat", "lon"]].to_numpy()
    rng = np.random.default_rng(0)
    cand = gallery[rng.choice(len(gallery), min(a.candidates, len(gallery)), replace=False)]
    quiet = queries[queries["signal"] == 0][["lat", "lon"]].to_numpy()
    share = len(quiet) / len(queries)
    const = best_constant(quiet, cand)
    print(f"| best constant for the photos without signal (in-sample) | {len(quiet):,} | "
          + " | ".join(f"{100 * const[t]:.1f}" for t in THRESHOLDS_KM) + " |")
    print(f"| bound: every photo with signal right, the rest at that constant | {len(queries):,} | "
          + " | ".join(f"{100 * (1 - share + share * const[t]):.1f}" for t in THRESHOLDS_KM) + " |")


if __name__ == "__main__":
    main()
