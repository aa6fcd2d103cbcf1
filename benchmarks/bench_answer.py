"""One photo's answer from its embedding (``locate_embeddings``), timed back to back, right after a bare forward
pass, and right after a sweep through memory larger than the last-level cache.

    python benchmarks/bench_answer.py --index /tmp/q66/B --images ../shared/data/im2gps3k-dev/images --n 60

Why (issue 25, item 1): whether the answer's assembly is slow because the forward pass empties the caches (then
the three would differ) or because of its own calls (then they agree). The photos are embedded once first; each
round then answers every embedding in each of the three settings. For a before/after comparison, run it from
two worktrees in alternating order (benchmarks/RESULTS.md, "Issue 25, thirteenth session").
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

import geo
from geo.data.images import expand_images

SWEEP_BYTES = 16 << 20  # twice this machine's 8 MB L3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True)
    ap.add_argument("--images", required=True, help="a folder of photos; the first --n are embedded once")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    index = geo.open_index(args.index)
    emb, errors = index.embed(expand_images(args.images)[:args.n])
    emb = np.delete(emb, list(errors), axis=0)
    pixels = torch.randn(1, 3, 224, 224)
    sweep = np.ones(SWEEP_BYTES, np.uint8)
    for row in emb[:5]:  # warm-up: the first answer loads the stages
        index.locate_embeddings(row[None])
    settings = {"back to back": lambda: None, "after a forward pass": lambda: index.backbone.embed(pixels),
                "after a 16 MB sweep": lambda: sweep.__iadd__(1)}
    times: dict[str, list[float]] = {k: [] for k in settings}
    for _ in range(args.rounds):
        for name, before in settings.items():
            for row in emb:
                before()
                t = time.perf_counter()
                index.locate_embeddings(row[None])
                times[name].append(time.perf_counter() - t)
    print(f"{len(emb)} photos x {args.rounds} rounds, ms; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name, v in times.items():
        print(f"{name}: median {1e3 * statistics.median(v):.2f}, least {1e3 * min(v):.2f}")


if __name__ == "__main__":
    main()
