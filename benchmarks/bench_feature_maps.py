"""EfficientNet-Lite0's forward with glibc's malloc defaults against the feature maps kept in the heaps
(``geo.core.memory.keep_feature_maps``), one process each, alternated.

    python benchmarks/bench_feature_maps.py [--rounds 2]

Each process times 60 / 15 / 6 / 4 passes at batches of 1 / 8 / 32 / 64 (ms a photo, median) and counts the page
faults of one more pass at each batch. The defaults' process sets ``GLIBC_TUNABLES`` to nothing, which glibc reads
as its defaults and geo as "the environment tunes malloc": the policy is left out. Peak RSS is the process's.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

BATCHES = {1: 60, 8: 15, 32: 6, 64: 4}


def measure() -> dict:
    import torch

    from geo.models.backbones import load_backbone

    bb = load_backbone("efficientnet_lite0", device="cpu")
    out = {}
    for batch, reps in BATCHES.items():
        x = torch.randn(batch, 3, 224, 224)
        for _ in range(3):
            bb.embed(x)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            bb.embed(x)
            times.append((time.perf_counter() - t) / batch * 1e3)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        bb.embed(x)
        out[batch] = (statistics.median(times), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure()))
        return
    print(f"load average {os.getloadavg()[0]:.2f}")
    print("| malloc | " + " | ".join(f"batch {b}: ms a photo (faults a pass)" for b in BATCHES) + " | peak RSS |")
    print("|---|" + "---|" * (len(BATCHES) + 1))
    for _ in range(args.rounds):
        for name, extra in (("glibc's defaults", {"GLIBC_TUNABLES": ""}), ("feature maps kept", {})):
            env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | extra
            got = json.loads(subprocess.run([sys.executable, __file__, "--child"], env=env, check=True,
                                            capture_output=True, text=True).stdout.splitlines()[-1])
            cells = [f"{got[str(b)][0]:.2f} ({got[str(b)][1]:,})" for b in BATCHES]
            print(f"| {name} | " + " | ".join(cells) + f" | {got['peak_rss_mb'] / 1024:.2f} GB |")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
