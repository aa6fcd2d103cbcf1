"""One ``geo build-index`` command, run in this process, every log line stamped with its RSS.

    /usr/bin/time -v python benchmarks/bench_build_memory.py build-index --embeddings G.parquet \
        --backbone synthetic-1280 --group AUTHOR --out B

The arguments are ``geo``'s own. Each line the build logs is printed as
``[seconds  rss NOW  peak-since-last PEAK GB] line``: PEAK is the highest RSS a 50 ms sampler thread saw
since the previous line, so it names the phase that set the build's peak. GNU time's "Maximum resident set
size" is the whole command's (benchmarks/RESULTS.md, "The one-command build at 150K x 1280").
"""
from __future__ import annotations

import sys
import threading
import time

import geo.cli.build as build_cli
import geo.pipeline as pipeline

T0 = time.time()
PEAK = [0.0]


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1e6


def sample() -> None:
    while True:
        PEAK[0] = max(PEAK[0], rss_gb())
        time.sleep(0.05)


def stamp(msg: str, *_, **__) -> None:
    print(f"[{time.time() - T0:7.1f}s rss {rss_gb():.2f} peak-since-last {PEAK[0]:.2f} GB] {msg}", flush=True)
    PEAK[0] = 0.0


def main() -> None:
    threading.Thread(target=sample, daemon=True).start()
    build = pipeline.build_index
    build_cli.build_index = lambda cfg, log=None, progress=True: build(cfg, stamp, progress=False)
    from geo.cli import app

    sys.argv = ["geo", *sys.argv[1:]]
    try:
        app()
    finally:
        stamp("done")


if __name__ == "__main__":
    main()
