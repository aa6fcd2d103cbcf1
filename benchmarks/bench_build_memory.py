"""One ``geo build-index`` command, run in this process, every log line stamped with its RSS.

    /usr/bin/time -v python benchmarks/bench_build_memory.py build-index --embeddings G.parquet \
        --backbone synthetic-1280 --group AUTHOR --out B

    python benchmarks/bench_build_memory.py --trace geo.stages.cells.stage:train_heads,geo.stages.cells.stage:_calibrate \
        build-index ... --force cells

The arguments are ``geo``'s own. Each line the build logs is printed as
``[seconds  rss NOW  peak-since-last PEAK GB] line``: PEAK is the highest RSS a 50 ms sampler thread saw
since the previous line, so it names the phase that set the build's peak. GNU time's "Maximum resident set
size" is the whole command's (benchmarks/RESULTS.md, "The one-command build at 150K x 1280").
``--trace MODULE:FUNCTION,...`` (first) also stamps the entry and exit of those functions, module-level names
as their callers look them up, with the process's RSS and high-water mark (``VmHWM``): a function whose exit
shows a higher high-water mark than its entry raised the build's peak inside it.
"""
from __future__ import annotations

import functools
import importlib
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


def hwm_gb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1e6


def trace(spec: str) -> None:
    """Wrap each ``module:function`` of ``spec`` (comma-separated) to stamp its entry and exit."""
    for item in spec.split(","):
        module_name, name = item.split(":")
        module = importlib.import_module(module_name)
        inner = getattr(module, name)

        def traced(*a, _inner=inner, _name=name, **k):
            stamp(f"> {_name} (high-water {hwm_gb():.2f} GB)")
            try:
                return _inner(*a, **k)
            finally:
                stamp(f"< {_name} (high-water {hwm_gb():.2f} GB)")
        setattr(module, name, functools.wraps(inner)(traced))


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--trace"]:
        trace(args[1])
        args = args[2:]
    threading.Thread(target=sample, daemon=True).start()
    build = pipeline.build_index
    build_cli.build_index = lambda cfg, log=None, progress=True: build(cfg, stamp, progress=False)
    from geo.cli import app

    sys.argv = ["geo", *args]
    try:
        app()
    finally:
        stamp("done")


if __name__ == "__main__":
    main()
