"""Full bundles from synthetic embeddings with real geography, at growing gallery sizes.

    python benchmarks/bench_scale.py --sizes 100000 300000 1000000 --dim 512 --out /tmp/geo-scale

Photos are YFCC26k's places and photographers (``../shared/data/yfcc/yfcc25600_places365.csv``),
replicated to the size asked with a few km of jitter, each replica a new photographer. An
embedding is tied to its place at several scales: a random direction per S2 cell at levels 2, 5
and 9 (continent, region, city), plus a photographer's style and noise, so neighbours, cells and
the GPS gallery all have something to find, and photos of unseen photographers are harder.

Each size is built with the real command (``geo build-index --embeddings``) one stage at a time,
each stage in its own process, so every stage gets its wall time and its peak RSS (from wait4); with
``--one-command``, as a user runs it instead: one process for every stage, whose peak RSS is what the user's
machine must hold (issue 25: at 1M x 512 at most 2x the embeddings).
Then: the bundle's bytes, fused accuracy on 1,000 queries by photographers the gallery never saw,
and the warm latency of one query from a precomputed embedding. Results go to OUT/results.json
and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from geo.core import s2
from geo.core.geodesy import THRESHOLDS_KM, haversine_km
from geo.query.index import open_index
from geo.store.embeddings import EmbeddingReader

YFCC = Path(__file__).resolve().parents[2] / "shared" / "data" / "yfcc" / "yfcc25600_places365.csv"
LEVELS = (2, 5, 9)
WEIGHTS = (1.0, 0.8, 0.6)
SHARD = 50_000
STAGE_RUNS = [("embeddings+knn", ["--skip", "cells", "--skip", "gallery", "--skip", "fusion"]),
              ("cells", ["--skip", "gallery", "--skip", "fusion"]),
              ("gallery", ["--skip", "fusion"]),
              ("fusion", ["--force", "fusion"])]  # the bundle recorded --skip fusion: --force un-skips it
ONE_COMMAND = [("one command", [])]


def _directions(ids: np.ndarray, level: int, dim: int) -> np.ndarray:
    """A fixed random unit direction per S2 cell id (seeded by the id), [n, dim]."""
    uniq, inv = np.unique(ids, return_inverse=True)
    out = np.empty((len(uniq), dim), np.float32)
    for k, u in enumerate(uniq):
        out[k] = np.random.default_rng([int(u) & 0xFFFFFFFF, int(u) >> 32, level]).standard_normal(dim)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out[inv]


def synthesize(n: int, dim: int, seed: int, authors_offset: int = 0) -> pd.DataFrame:
    base = pd.read_csv(YFCC, usecols=["IMG_ID", "AUTHOR", "LAT", "LON"])
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(base), n)
    replica = np.arange(n) // len(base) + authors_offset
    lat = np.clip(base["LAT"].to_numpy()[pick] + rng.normal(0, 0.03, n), -89.9, 89.9)
    lon = (base["LON"].to_numpy()[pick] + rng.normal(0, 0.03, n) + 180) % 360 - 180
    author = np.char.add(base["AUTHOR"].astype(str).to_numpy()[pick], np.char.add("-", replica.astype(str)))
    leaf = s2.leaf_ids(lat, lon)
    emb = np.zeros((n, dim), np.float32)
    for level, w in zip(LEVELS, WEIGHTS):
        emb += w * _directions(s2.parent_ids(leaf, level), level, dim)
    styles = np.random.default_rng(99).standard_normal((4096, dim)).astype(np.float32) / np.sqrt(dim)
    emb += 0.5 * styles[np.unique(author, return_inverse=True)[1] % len(styles)]  # a photographer's habits
    emb += rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)  # everything else in the photo
    return pd.DataFrame({"id": [f"s{seed}-{i}" for i in range(n)], "lat": lat, "lon": lon, "AUTHOR": author,
                         "embedding": list(emb)})


def write(df: pd.DataFrame, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(df), SHARD):
        part = df.iloc[i:i + SHARD]
        t = pa.Table.from_pandas(part.drop(columns=["embedding"]), preserve_index=False)
        flat = pa.array(np.stack(part["embedding"]).reshape(-1))
        t = t.append_column("embedding", pa.FixedSizeListArray.from_arrays(flat, len(part["embedding"].iloc[0])))
        pq.write_table(t, folder / f"part-{i // SHARD:05d}.parquet")


def run(cmd: list[str]) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit code) of one process.

    The peak comes from GNU time, which forks the command from its own small
    process: the rusage of a child forked straight from this (large) process
    would start at this process's RSS, which the fork shares.
    """
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb=%M", *cmd], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    peak = [int(line.split("=")[1]) for line in proc.stderr.splitlines() if line.startswith("maxrss_kb=")]
    if proc.returncode:
        print(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}", file=sys.stderr)
    return wall, (peak[-1] * 1024 if peak else 0), proc.returncode


def bench(n: int, dim: int, out: Path, queries: int, runs: list[tuple[str, list[str]]]) -> dict:
    src, bundle = out / f"emb-{n}", out / f"bundle-{n}"
    if not src.exists():
        write(synthesize(n, dim, seed=0), src)
    qdir = out / f"queries-{dim}"
    if not qdir.exists():
        write(synthesize(queries, dim, seed=1, authors_offset=10_000), qdir)  # photographers no gallery has
    row: dict = {"n": n, "dim": dim, "embedding_bytes": n * dim * 4, "stages": {}}
    geo = [sys.executable, "-c", "from geo.cli import app; app()"]
    for stage, skip in runs:
        wall, rss, code = run([*geo, "build-index", "--embeddings", str(src), "--backbone", f"synthetic-{dim}",
                               "--group", "AUTHOR", "--out", str(bundle), "-q", *skip])
        row["stages"][stage] = {"seconds": round(wall, 1), "peak_rss": rss, "ok": code == 0}
    row["total_seconds"] = round(sum(s["seconds"] for s in row["stages"].values()), 1)
    row["peak_rss"] = max(s["peak_rss"] for s in row["stages"].values())
    row["bundle_bytes"] = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    index = open_index(bundle)
    q = pd.concat([pq.read_table(f).to_pandas() for f in sorted(qdir.glob("*.parquet"))])
    emb = np.stack(q["embedding"]).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ans = index.locate_embeddings(emb, mode="fused")
    err = haversine_km([a.lat for a in ans], [a.lon for a in ans], q["lat"], q["lon"])
    row["fused_accuracy"] = {str(t): round(float(np.mean(err <= t)), 4) for t in THRESHOLDS_KM}
    index.locate_embeddings(emb[:1], mode="fused")
    times = []
    for i in range(50):
        t0 = time.perf_counter()
        index.locate_embeddings(emb[i:i + 1], mode="fused")
        times.append(time.perf_counter() - t0)
    row["warm_query_ms"] = round(1e3 * float(np.median(times)), 2)
    row["index"] = index.bundle.stage("knn_index").get("factory")
    row["recall@10"] = index.bundle.stage("knn_index").get("recall@10")
    row["rows"] = EmbeddingReader(index.bundle).count
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=Path("/tmp/geo-scale"))
    ap.add_argument("--one-command", action="store_true", help="build each size in one process, as a user does "
                    "(the default: one process per stage)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    load = open("/proc/loadavg").read().split()[:3]
    runs = ONE_COMMAND if args.one_command else STAGE_RUNS
    results = []
    for n in args.sizes:  # written after each size, so a long run's finished sizes survive an interruption
        results.append(bench(n, args.dim, args.out, args.queries, runs))
        results[-1]["load_after"] = open("/proc/loadavg").read().split()[:3]
        (args.out / "results.json").write_text(json.dumps({"load_start": load, "results": results}, indent=2))
    gib = 1 << 30
    print(f"load at start {' '.join(load)}; {os.cpu_count()} cores\n")
    print("| photos | total s | " + " | ".join(f"{s} s / GiB" for s, _ in runs)
          + " | peak RSS / embeddings | bundle GiB | index | recall@10 | warm query ms | fused 25/200/750/2500 km |")
    print("|---" * (7 + len(runs)) + "|")
    for r in results:
        stages = " | ".join(f"{v['seconds']} / {v['peak_rss'] / gib:.2f}" + ("" if v["ok"] else " (failed)")
                            for v in r["stages"].values())
        acc = "/".join(f"{100 * r['fused_accuracy'][t]:.1f}" for t in ("25", "200", "750", "2500"))
        print(f"| {r['n']:,} | {r['total_seconds']} | {stages} | {r['peak_rss'] / r['embedding_bytes']:.2f} | "
              f"{r['bundle_bytes'] / gib:.2f} | {r['index']} | {r['recall@10']} | {r['warm_query_ms']} | {acc} |")


if __name__ == "__main__":
    main()
