"""What bounds `geo serve`'s rate against a bare batched forward on this machine (issue 25, item 8): the forward's
cost a photo in each thread layout, and an answer's cost a row in each batch size.

    python benchmarks/bench_serve_ceiling.py --bundle /tmp/q66/B2 --images ../shared/data/im2gps3k-dev/images

1. The bundle's backbone on the same decoded photos, forward only, at batches of 1-16: on one thread, on every
   core (``torch.set_num_threads``), and as one single-core thread a core side by side, each taking every
   other batch (the layout of the server's model threads). Best of 3 passes, ms a photo of wall time.
2. ``GeoIndex.locate_embeddings`` on those photos' embeddings at 1-16 rows a call, on one thread: ms a row.

The server at concurrency 8 forms batches of about two; the bare forward it is held against runs a batch of 8 on
every core. The first table gives the gap between the two layouts; the second gives what answering in small
batches adds. bench_serve.py gives the rest: the event loop's and the client's CPU a request.
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch

from geo.data.images import ImageDataset, expand_images
from geo.query.index import open_index
from geo.serve.batcher import _one_core

BATCHES = (1, 2, 4, 8, 16)


def forward_ms(embed, x: torch.Tensor, batch: int, threads: int, side_by_side: bool) -> float:
    """Best of 3 passes over ``x``: ms a photo."""
    def share(first: int, step: int) -> None:
        if side_by_side:
            _one_core()
        for s in range(first, len(x), step):
            embed(x[s:s + batch])

    torch.set_num_threads(threads)
    embed(x[:batch])  # warm
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        if side_by_side:
            workers = [threading.Thread(target=share, args=(k * batch, threads * batch)) for k in range(threads)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        else:
            share(0, batch)
        best = min(best, time.perf_counter() - t)
    return 1e3 * best / len(x)


def answer_ms(index, emb: np.ndarray, rows: int) -> float:
    """Best of 3 passes of ``locate_embeddings`` over ``emb``, ``rows`` a call: ms a row."""
    index.locate_embeddings(emb[:rows])
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for s in range(0, len(emb), rows):
            index.locate_embeddings(emb[s:s + rows])
        best = min(best, time.perf_counter() - t)
    return 1e3 * best / len(emb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--n", type=int, default=64, help="photos (a multiple of 32 keeps every batch full)")
    args = ap.parse_args()
    index = open_index(args.bundle)
    bb = index.backbone
    data = ImageDataset(expand_images([str(args.images)])[:args.n], bb.preprocess)
    x = torch.cat([t for _, t, _ in (data[i] for i in range(len(data))) if t is not None])
    cores = len(os.sched_getaffinity(0))
    print(f"{len(x)} photos, {cores} cores; load average {os.getloadavg()[0]:.2f}\n")
    print(f"| batch | 1 thread | {cores} threads | {cores} single-core threads side by side |\n|---|---|---|---|")
    for b in BATCHES:
        row = [forward_ms(bb.embed, x, b, 1, False), forward_ms(bb.embed, x, b, cores, False),
               forward_ms(bb.embed, x, b, cores, True)]
        print(f"| {b} | " + " | ".join(f"{v:.2f}" for v in row) + " |", flush=True)
    torch.set_num_threads(cores)
    emb = bb.embed(x)
    _one_core()
    print("\n| rows a call | answer ms a row (one thread) |\n|---|---|")
    for rows in BATCHES:
        print(f"| {rows} | {answer_ms(index, emb, rows):.2f} |", flush=True)
    print(f"\nload average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
