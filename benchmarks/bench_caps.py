"""What the GPS gallery's caps cost in accuracy, on bench_scale's synthetic 100K gallery.

    python benchmarks/bench_scale.py --sizes 100000 --out /tmp/geo-scale     # makes the bundle first
    python benchmarks/bench_caps.py --bundle /tmp/geo-scale/bundle-100000 --queries /tmp/geo-scale/queries-512

The gallery stage is fitted in memory (``fit_gallery``, as the pipeline does, on the pipeline's
held-out photographers) under each setting, and answers bench_scale's 1,000 queries by photographers
the gallery never saw with its best point (``--mode gallery``). Settings: the defaults (at most 100K
points, 40 rounds of 10,000 photos), fewer points (25K), and twice the training budget (rounds of
20,000 photos, the previous default). Prints a markdown table and writes OUT.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from geo.core.geodesy import THRESHOLDS_KM, haversine_km
from geo.core.splits import group_column, validation_mask
from geo.pipeline import SPLIT_SEED, VAL_FRACTION
from geo.stages.gallery.stage import GalleryConfig, fit_gallery
from geo.store.bundle import open_bundle
from geo.store.embeddings import EmbeddingReader

SETTINGS = {
    "defaults (100K points, 40 x 10K photos)": {},
    "25K points": {"max_points": 25_000},
    "2x training (40 x 20K photos)": {"round_photos": 20_000},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--queries", type=Path, required=True, help="bench_scale's queries folder (Parquet)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/geo-caps.json"))
    args = ap.parse_args()
    meta, emb = EmbeddingReader(open_bundle(args.bundle)).read()
    col = group_column(meta.columns, "AUTHOR")
    val = validation_mask(len(meta), meta[col].astype(str).to_numpy(), VAL_FRACTION, SPLIT_SEED)
    q = pd.concat([pq.read_table(f).to_pandas() for f in sorted(args.queries.glob("*.parquet"))])
    qemb = np.stack(q["embedding"]).astype(np.float32)
    qemb /= np.linalg.norm(qemb, axis=1, keepdims=True)
    rows = []
    for name, change in SETTINGS.items():
        t0 = time.perf_counter()
        gallery = fit_gallery(meta, emb, dataclasses.replace(GalleryConfig(group_column=col), **change),
                              "synthetic-512", log=lambda *_: None, val=val)
        seconds = time.perf_counter() - t0
        latlon, _ = gallery.search(qemb, k=1)
        err = haversine_km(latlon[:, 0, 0], latlon[:, 0, 1], q["lat"].to_numpy(), q["lon"].to_numpy())
        rows.append({"setting": name, "seconds": round(seconds, 1), "points": gallery.info["n_points"],
                     "rounds": gallery.info["train"]["epochs_run"],
                     **{f"{t}km": round(100 * float(np.mean(err <= t)), 1) for t in THRESHOLDS_KM},
                     "median_km": round(float(np.median(err)), 1)})
        print(rows[-1], flush=True)
    args.out.write_text(json.dumps({"load": open("/proc/loadavg").read().split()[:3], "rows": rows}, indent=2))
    print("| setting | points | rounds run | stage s | " + " | ".join(f"{t} km" for t in THRESHOLDS_KM) + " | median km |")
    print("|---" * (5 + len(THRESHOLDS_KM)) + "|")
    for r in rows:
        print(f"| {r['setting']} | {r['points']:,} | {r['rounds']} | {r['seconds']} | "
              + " | ".join(str(r[f"{t}km"]) for t in THRESHOLDS_KM) + f" | {r['median_km']} |")


if __name__ == "__main__":
    main()
