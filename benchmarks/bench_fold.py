"""EfficientNet-Lite0's forward with its BatchNorms against the folded copy that ``Backbone.embed`` runs.

    python benchmarks/bench_fold.py [--reps 100]

Both are geo's network, channels-last, on the same random input, interleaved call by call in one process at
batches of 1, 8 and 32, so machine load touches them alike. Prints ms a photo (median and least) and the
folded / BatchNorm ratio per batch, the largest difference of their features, and the fold's own cost (paid
once, on a process's first photo).
"""
from __future__ import annotations

import argparse
import os
import time

from geo.models.backbones import load_backbone
from geo.models.efficientnet_lite import folded
from interleaved import compare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=100, help="calls of each at batch 1 (fewer at 8 and 32)")
    args = ap.parse_args()
    network = load_backbone("efficientnet_lite0", device="cpu").model.eval()
    t = time.perf_counter()
    copy = folded(network)
    print(f"fold: {1e3 * (time.perf_counter() - t):.1f} ms; load average {os.getloadavg()[0]:.2f}")
    compare(("with BatchNorm", network), ("folded", copy), args.reps)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
