"""Warm fused latency from precomputed embeddings: several bundles, interleaved query by query.

    python benchmarks/bench_fused_latency.py --index before=B0 --index after=B --embeddings Q.parquet [--n 300]

Issue 24: a warm fused query with the reranker answering within 10 % of the mixture's, at 150K photos. The
image model is left out (both bundles would run the same forward pass): each query's embedding goes through
``GeoIndex.locate_embeddings`` of every bundle in turn, the order rotating from query to query, so machine
load touches all of them alike. Prints, per bundle, the median and 90th-percentile wall time and CPU time in
ms, the median's ratio to the first bundle's, and the load average before and after.

    python benchmarks/bench_fused_latency.py --index B --embeddings Q.parquet --parts

``--parts`` (issue 25): one bundle's answer split by part (the kNN and gallery searches, decide, cells, the
region, country, places, neighbours, the rest), each part's own time as ``bench_query.py --parts`` clocks
it. On a bundle of real size this is where a query's time beyond its forward pass goes; a 60-photo bundle
hides the searches' scans and the region's union of a hundred cells. ``--after-forward`` runs a forward pass
before each answer (untimed), as a real query does.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import numpy as np
import pyarrow.parquet as pq
import torch

from bench_query import PARTS, PartClock

from geo.models.backbones import load_backbone
from geo.query.index import open_index


def _query_embeddings(path: str, n: int) -> np.ndarray:
    col = pq.read_table(path, columns=["embedding"]).column("embedding").slice(0, n)
    return np.stack(col.to_numpy(zero_copy_only=False)).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", action="append", required=True, help="NAME=BUNDLE (repeat; the first is the base)")
    ap.add_argument("--embeddings", required=True, help="queries' Parquet with an embedding column")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--mode", default="fused")
    ap.add_argument("--parts", action="store_true", help="the first bundle's answer by part")
    ap.add_argument("--after-forward", action="store_true",
                    help="before each answer, EfficientNet-Lite0's forward on a random image (untimed), as in a real "
                         "query: the answer then meets the caches and spinning threads that a forward leaves")
    a = ap.parse_args()
    before = _forward() if a.after_forward else (lambda: None)
    bundles = dict(s.split("=", 1) for s in a.index)
    indexes = {name: open_index(path) for name, path in bundles.items()}
    emb = _query_embeddings(a.embeddings, a.n)
    for ix in indexes.values():  # warm: first-query caches (country shapes, places, the heads' tables)
        ix.locate_embeddings(emb[:2], mode=a.mode)
    if a.parts:
        by_part(next(iter(indexes.values())), emb, a.mode, before)
        return
    wall = {name: [] for name in indexes}
    cpu = {name: [] for name in indexes}
    load0 = os.getloadavg()[0]
    names = list(indexes)
    for i, e in enumerate(emb):
        for name in names[i % len(names):] + names[:i % len(names)]:
            before()
            t, c = time.perf_counter(), time.process_time()
            indexes[name].locate_embeddings(e[None], mode=a.mode)
            wall[name].append(1e3 * (time.perf_counter() - t))
            cpu[name].append(1e3 * (time.process_time() - c))
    base = statistics.median(wall[names[0]])
    print(f"{len(emb)} queries, mode {a.mode}, load average {load0:.2f} -> {os.getloadavg()[0]:.2f}")
    print("| bundle | median ms | p90 ms | median CPU ms | ratio to " + names[0] + " |\n|---|---|---|---|---|")
    for name in names:
        w = sorted(wall[name])
        print(f"| {name} | {statistics.median(w):.2f} | {w[int(0.9 * len(w))]:.2f} | "
              f"{statistics.median(cpu[name]):.2f} | {statistics.median(w) / base:.3f} |")


def _forward() -> Callable[[], object]:
    """A call that runs the default backbone's forward pass on one random image."""
    bb = load_backbone("efficientnet_lite0", device="cpu")
    x = torch.randn(1, 3, 224, 224)
    return lambda: bb.embed(x)


def by_part(index, emb: np.ndarray, mode: str, before: Callable[[], object]) -> None:
    """Median wall and CPU ms of each part of ``locate_embeddings``, one query at a time (``before`` each)."""
    rows = []
    with PartClock() as clock:
        for e in emb:
            before()
            clock.reset()
            t, c = time.perf_counter(), time.process_time()
            index.locate_embeddings(e[None], mode=mode)
            total = (time.perf_counter() - t, time.process_time() - c)
            rows.append(clock.row(total) | {"answer": total})
    print(f"{len(rows)} queries, mode {mode}, load average {os.getloadavg()[0]:.2f}; ms")
    print("| part | median wall | median cpu |\n|---|---|---|")
    for name in [p for p in PARTS if any(r[p][0] for r in rows)] + ["rest", "answer"]:
        print(f"| {name} | {statistics.median(1e3 * r[name][0] for r in rows):.2f} | "
              f"{statistics.median(1e3 * r[name][1] for r in rows):.2f} |")


if __name__ == "__main__":
    main()
