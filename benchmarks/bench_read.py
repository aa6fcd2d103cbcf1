"""Reading a photo's bytes through ``geo.core.files.read_capped`` against a bare ``open(path, "rb").read()``.

    python benchmarks/bench_read.py --images ../shared/data/im2gps3k-dev/images [--n 60] [--rounds 5]

``read_capped`` is how every photo of a query or a build is read: on the open descriptor it refuses what is not
a regular file or is over the cap (``GEO_MAX_FILE_BYTES``), and it reads one byte past the size so that a file
which grew is seen. The two are interleaved file by file in one process (the files already in the page cache);
the script prints the median µs of each and their ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from geo.core.files import read_capped
from geo.data.images import expand_images


def bare(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    files = expand_images(args.images)[:args.n]
    times: dict[str, list[float]] = {"bare": [], "read_capped": []}
    for path in files:  # into the page cache
        assert read_capped(path) == bare(path)
    for _ in range(args.rounds):
        for path in files:
            for name, read in (("bare", bare), ("read_capped", read_capped)):
                t = time.perf_counter()
                read(path)
                times[name].append(time.perf_counter() - t)
    b, r = (1e6 * statistics.median(times[k]) for k in ("bare", "read_capped"))
    print(f"{len(files)} files x {args.rounds} rounds, load average {os.getloadavg()[0]:.2f}: bare open().read() "
          f"{b:.1f} us, read_capped {r:.1f} us: {r / b:.2f}x")


if __name__ == "__main__":
    main()
