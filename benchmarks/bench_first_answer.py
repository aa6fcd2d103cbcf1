"""Time to first answer: how long a user waits for `geo query` on a large bundle, whole process included.

Why: a one-off `geo query` pays for everything before the answer: Python and torch
imports, opening (and hash-verifying) the bundle, reading the FAISS index and the
shard metadata, rebuilding the backbone, then one search. Warm per-image latency
(bench_query.py) hides all of that; on a bundle with ~1 GB of embeddings the start-up
cost is what a user actually feels. This script times the whole process, per code
tree, against a bare `python -c "import torch"` as the floor no query can beat.

How:

    # 1. a synthetic bundle: 210,000 x 1280 float32 (~1.0 GiB) embeddings, kNN index only.
    #    Built with this tree's API; the bundle format (geo-bundle v1) is the one every tree reads.
    python benchmarks/bench_first_answer.py make --out /tmp/first-answer-1g

    # 2. time `geo query IMG --index DIR --mode knn --json`, trees interleaved per repeat
    python benchmarks/bench_first_answer.py time --index /tmp/first-answer-1g \\
        --image examples/osv5m/queries/<first>.jpg --repeats 3 --trees /work/baseline,/work/main

`make` writes shards of 50,000 rows (id, path, lat, lon, AUTHOR, embedding); the
embeddings are seeded random L2-normalised vectors generated one shard at a time,
and the coordinates and photographers are resampled (with a little jitter) from
the YFCC places365 CSV, so the gallery's geography looks like real photos'. The
kNN index is an exact Flat inner-product index (exact_max is raised above N). The
manifest records exactly `load_backbone(<backbone>).spec()`, so a query rebuilds
that backbone. A re-run of `make` on the same --out skips finished shards.

`time` runs every command as a fresh subprocess with PYTHONPATH set to the tree,
measures wall clock from start to exit, and prints a markdown table (median
seconds, ratio to bare `import torch`), the machine load at start and end, and the
first answer of each tree. A tree whose query fails is reported with its stderr
tail. The bundle's files are in the page cache after `make` (warm-cache numbers).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import geo
from geo.models.backbones import load_backbone
from geo.pipeline import write_errors
from geo.stages.knn import KnnConfig, fit_knn
from geo.store.bundle import Bundle, read_json
from geo.store.embeddings import (
    EmbeddingReader,
    finished_shards,
    marker_path,
    shard_path,
    write_shard,
)

DIM = 1280
SHARD_ROWS = 50_000
DEFAULT_ROWS = 210_000  # 210,000 x 1280 x 4 B = 1.00 GiB of float32 embeddings
DEFAULT_PLACES = "/work/shared/data/yfcc/yfcc25600_places365.csv"


# ------------------------------------------------------------------ make
def make_bundle(out: str, rows: int, places: str, backbone_name: str, seed: int, jitter_deg: float) -> None:
    import numpy as np
    import pandas as pd

    t_all = time.perf_counter()
    spec = load_backbone(backbone_name).spec()  # exactly what a query will rebuild
    dim = int(spec["dim"])
    src = pd.read_csv(places, usecols=["LAT", "LON", "AUTHOR"])
    src = src[src["LAT"].between(-90, 90) & src["LON"].between(-180, 180)].reset_index(drop=True)
    print(f"make: geo from {Path(geo.__file__).parent}", flush=True)
    print(f"make: {rows:,} x {dim} float32 = {rows * dim * 4 / 2**30:.2f} GiB of embeddings, "
          f"geography from {len(src):,} rows of {places}", flush=True)

    bundle = Bundle.create_or_resume(out, spec, dim)
    n_shards = -(-rows // SHARD_ROWS)
    for i in range(n_shards):
        lo, hi = i * SHARD_ROWS, min(rows, (i + 1) * SHARD_ROWS)
        marker = marker_path(shard_path(bundle, i))
        if marker.exists() and json.loads(marker.read_text()).get("ok") == hi - lo:
            print(f"make: shard {i} already written", flush=True)
            continue
        t0 = time.perf_counter()
        rng = np.random.default_rng([seed, i])  # one stream per shard: resumable and order-independent
        pick = rng.integers(0, len(src), hi - lo)
        lat = np.clip(src["LAT"].to_numpy(np.float64)[pick] + rng.normal(0, jitter_deg, hi - lo), -90.0, 90.0)
        lon = (src["LON"].to_numpy(np.float64)[pick] + rng.normal(0, jitter_deg, hi - lo) + 180.0) % 360.0 - 180.0
        meta = pd.DataFrame({
            "id": [f"synth-{j:07d}" for j in range(lo, hi)],
            "path": [f"/synthetic/{j:07d}.jpg" for j in range(lo, hi)],
            "lat": lat, "lon": lon,
            "AUTHOR": src["AUTHOR"].astype(str).to_numpy()[pick],
        })
        emb = rng.standard_normal((hi - lo, dim), dtype=np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        seconds = time.perf_counter() - t0
        write_shard(bundle, i, meta, emb, {"first_row": lo, "rows": hi - lo, "failed": 0,
                                           "seconds": round(seconds, 3), "images_per_s": None, "errors": []})
        del emb, meta
        print(f"make: shard {i} ({hi - lo:,} rows) in {time.perf_counter() - t0:.1f} s", flush=True)

    shards = finished_shards(bundle)
    markers = [read_json(marker_path(p)) for p in shards]
    ok = sum(m["ok"] for m in markers)
    files = [p for s in shards for p in (s, marker_path(s))]
    bundle.commit("embeddings", files, {"shards": len(shards), "ok": ok, "failed": 0, "images_per_s": None,
                                        "synthetic": {"seed": seed, "jitter_deg": jitter_deg, "places": places}},
                  replace=("embeddings/",))
    failed = write_errors(bundle, [])
    bundle.manifest["counts"] = {"manifest_rows": ok, "ok": ok, "failed": failed}
    bundle.save()
    t0 = time.perf_counter()
    config = KnnConfig(ram_budget="8GB", exact_max=max(rows, ok) + 1)  # above N: an exact Flat index
    knn = fit_knn(EmbeddingReader(bundle), config, log=lambda m: print(m, flush=True))
    knn_files, knn_infos = knn.save(bundle)
    bundle.commit("knn_index", knn_files, knn_infos, replace=("index/",))
    print(f"make: kNN index in {time.perf_counter() - t0:.1f} s; bundle {out} done in "
          f"{time.perf_counter() - t_all:.1f} s", flush=True)


# ------------------------------------------------------------------ time
def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    return time.perf_counter() - t, p


def _env(tree: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if tree is None:
        env.pop("PYTHONPATH", None)
    else:
        env["PYTHONPATH"] = tree
    return env


def _geo_exe() -> str:
    cand = Path(sys.executable).parent / "geo"
    return str(cand) if cand.exists() else (shutil.which("geo") or "geo")


def time_query(index: str, image: str, repeats: int, trees: list[str]) -> None:
    geo = _geo_exe()
    load_start = _loadavg()
    bare = [sys.executable, "-c", "import torch"]
    times: dict[str, list[float]] = {t: [] for t in trees}
    torch_times: list[float] = []
    first: dict[str, str] = {}
    failed: dict[str, str] = {}
    resolved = {}
    for t in trees:  # which geo package each tree's PYTHONPATH really imports (cheap: no torch)
        # -P: no cwd on sys.path, as for the `geo` script (whose sys.path[0] is the venv's bin/)
        p = subprocess.run([sys.executable, "-P", "-c", "import geo; print(geo.__file__)"], env=_env(t), check=False,
                           capture_output=True, text=True)
        resolved[t] = p.stdout.strip() or f"(import failed: {p.stderr.strip()[-200:]})"
    for r in range(repeats):
        s, p = _run(bare, _env(None))
        torch_times.append(s)
        print(f"repeat {r + 1}: import torch {s:.2f} s", file=sys.stderr, flush=True)
        for t in trees:
            if t in failed:
                continue
            s, p = _run([geo, "query", image, "--index", index, "--mode", "knn", "--json"], _env(t))
            if p.returncode != 0:
                failed[t] = f"exit {p.returncode}: " + p.stderr.strip()[-1500:]
                print(f"repeat {r + 1}: {t} FAILED after {s:.2f} s", file=sys.stderr, flush=True)
                continue
            times[t].append(s)
            if t not in first:
                try:
                    ans = json.loads(p.stdout.strip().splitlines()[-1])
                    first[t] = f"lat {ans.get('lat')}, lon {ans.get('lon')}, mode {ans.get('mode')}, " \
                               f"confidence {ans.get('confidence')}, error {ans.get('error')}"
                except (ValueError, IndexError) as e:
                    first[t] = f"(unparsable stdout: {e}: {p.stdout[-300:]!r})"
            print(f"repeat {r + 1}: {t} {s:.2f} s", file=sys.stderr, flush=True)
    load_end = _loadavg()

    torch_med = statistics.median(torch_times)
    print(f"\n`geo query IMG --index {index} --mode knn --json`, whole process, {repeats} repeats interleaved\n")
    print(f"image: {image}")
    print(f"loadavg (1/5/15 min): start {load_start}, end {load_end}; cpus: {os.cpu_count()}\n")
    print("| what | median s | runs (s) | x bare `import torch` |")
    print("|---|---:|---|---:|")
    print(f"| bare `python -c \"import torch\"` | {torch_med:.2f} | "
          f"{', '.join(f'{x:.2f}' for x in torch_times)} | 1.00 |")
    for t in trees:
        if times[t]:
            med = statistics.median(times[t])
            print(f"| `geo query` {t} | {med:.2f} | {', '.join(f'{x:.2f}' for x in times[t])} | "
                  f"{med / torch_med:.2f} |")
        else:
            print(f"| `geo query` {t} | failed | | |")
    print()
    for t in trees:
        print(f"- {t} (geo from {resolved[t]}): first answer: {first.get(t, '-')}")
        if t in failed:
            print(f"  FAILED, stderr tail:\n```\n{failed[t]}\n```")


# ------------------------------------------------------------------ cli
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make", help="create a synthetic bundle (with this tree's API)")
    mk.add_argument("--out", required=True)
    mk.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    mk.add_argument("--places", default=DEFAULT_PLACES, help="CSV with LAT, LON, AUTHOR columns")
    mk.add_argument("--backbone", default="efficientnet_lite0")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--jitter-deg", type=float, default=0.01, help="s.d. of the coordinate jitter in degrees")
    tm = sub.add_parser("time", help="time whole `geo query` processes per tree")
    tm.add_argument("--index", required=True)
    tm.add_argument("--image", required=True)
    tm.add_argument("--repeats", type=int, default=3)
    tm.add_argument("--trees", default="/work/baseline,/work/main", help="comma-separated tree roots (PYTHONPATH)")
    args = ap.parse_args()
    if args.cmd == "make":
        make_bundle(args.out, args.rows, args.places, args.backbone, args.seed, args.jitter_deg)
    else:
        time_query(args.index, args.image, args.repeats, [t for t in args.trees.split(",") if t])


if __name__ == "__main__":
    main()
