"""Warm single-image latency of each query mode against kNN-only, on one bundle, in one run.

    python benchmarks/bench_query.py --index /tmp/dev-all --images ../shared/data/im2gps3k-dev/images

Goal (issue 5): a fused query costs at most 10 % more than a kNN-only one on the default backbone.
Both include decoding and the forward pass, as a user's `locate_one(path)` does; the modes are
interleaved photo by photo so machine load affects them alike.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import geo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", required=True)
    ap.add_argument("--images", default="../shared/data/im2gps3k-dev/images")
    ap.add_argument("--n", type=int, default=40)
    args = ap.parse_args()
    index = geo.open_index(args.index)
    files = [str(f) for f in sorted(Path(args.images).glob("*.jpg"))[: args.n]]
    modes = index.modes
    for m in modes:  # warm: model, heads, gallery, caches
        index.locate_one(files[0], mode=m)
    times = {m: [] for m in modes}
    for f in files:
        for m in modes:
            t = time.perf_counter()
            index.locate_one(f, mode=m)
            times[m].append((time.perf_counter() - t) * 1e3)
    knn = statistics.median(times["knn"])
    print(f"{len(files)} photos, warm, median ms per locate_one(path):")
    for m in modes:
        med = statistics.median(times[m])
        print(f"  {m:8s} {med:8.2f} ms   x{med / knn:.3f} of knn")


if __name__ == "__main__":
    main()
