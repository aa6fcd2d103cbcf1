"""What one query's exact FAISS scans cost at the sizes real bundles reach, and what IVF and HNSW would cost.

    python benchmarks/bench_search_scale.py [--points 10500,100000] [--queries 200]

A bundle searches two flat indexes per query: the kNN index (``Flat`` up to ``KnnConfig.exact_max`` = 100,000
photos, at the backbone's dimension: 1280 for EfficientNet-Lite0) and the GPS gallery (``IndexFlatIP`` over
up to ``GalleryConfig.max_points`` = 100,000 points of 512 + 1 dimensions). A 60-photo bundle never shows
their cost. Prints the median wall time of one query (one at a time, as ``geo query`` and the server's small
batches search) for Flat at each size and dimension, then, on the largest gallery, IVF (nlist ~ sqrt(n), as
``geo.stages.knn`` lays it out) and HNSW32 at a few settings with their recall of the exact top-32.

The vectors are synthetic: unit vectors around 2,000 centres (places), which makes recall easier than on real
location features. The timings do not depend on the data; the recalls are an upper bound.
"""
from __future__ import annotations

import argparse
import os
import time

import faiss
import numpy as np


def _clustered(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    x = centres[rng.integers(0, len(centres), n)] + 0.35 * rng.standard_normal((n, centres.shape[1]), dtype=np.float32)
    faiss.normalize_L2(x)
    return x


def one_query_ms(index: faiss.Index, q: np.ndarray, k: int, params=None) -> float:
    """Median wall ms of searching the rows of ``q`` one at a time."""
    index.search(q[:1], k, params=params)
    times = []
    for row in q:
        t = time.perf_counter()
        index.search(row[None], k, params=params)
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def recall(index: faiss.Index, q: np.ndarray, truth: np.ndarray, k: int, params=None) -> float:
    _, got = index.search(q, k, params=params)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, truth)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default="10500,100000", help="index sizes, comma-separated")
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    sizes = [int(p) for p in args.points.split(",")]
    rng = np.random.default_rng(0)
    print(f"load average {os.getloadavg()[0]:.2f}; one query at a time, median ms")
    print("| index | vectors | ms | recall@32 |\n|---|---|---|---|")
    for dim, k, what in ((513, 32, "gallery Flat"), (1280, 50, "kNN Flat (Lite0)")):
        centres = rng.standard_normal((2000, dim), dtype=np.float32)
        q = _clustered(rng, centres, args.queries)
        for n in sizes:
            flat = faiss.IndexFlatIP(dim)
            flat.add(_clustered(rng, centres, n))
            print(f"| {what} | {n:,} x {dim} | {one_query_ms(flat, q, k):.2f} | exact |", flush=True)
            if dim == 513 and n == max(sizes):
                _approximate(flat, q, n, dim)
            del flat


def _approximate(flat: faiss.IndexFlatIP, q: np.ndarray, n: int, dim: int) -> None:
    """IVF and HNSW over the same gallery vectors, against the exact top-32."""
    x = flat.reconstruct_n(0, n)
    _, truth = flat.search(q, 32)
    nlist = int(2 ** round(np.log2(np.sqrt(n))))
    ivf = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    t = time.perf_counter()
    ivf.train(x[: nlist * 64])
    ivf.add(x)
    print(f"| IVF{nlist},Flat (built in {time.perf_counter() - t:.1f} s) | | | |")
    for nprobe in (8, 16, 32):
        p = faiss.SearchParametersIVF(nprobe=nprobe)
        print(f"| ... nprobe {nprobe} | {n:,} x {dim} | {one_query_ms(ivf, q, 32, p):.2f} | "
              f"{recall(ivf, q, truth, 32, p):.4f} |")
    hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 80
    t = time.perf_counter()
    hnsw.add(x)
    print(f"| HNSW32 (built in {time.perf_counter() - t:.1f} s) | | | |")
    for ef in (64, 128):
        p = faiss.SearchParametersHNSW(efSearch=ef)
        print(f"| ... efSearch {ef} | {n:,} x {dim} | {one_query_ms(hnsw, q, 32, p):.2f} | "
              f"{recall(hnsw, q, truth, 32, p):.4f} |")


if __name__ == "__main__":
    main()
