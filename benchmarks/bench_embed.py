"""Embedding-stage throughput and warm query latency, each against the model's bare forward pass.

    python benchmarks/bench_embed.py --images ../shared/data/im2gps3k-dev/images --n 320

Ratios, not absolute times, are the result: the bare forward pass (random
input, same model, batch size, threads and process) is measured in the same
run, so the ratios say what decoding, sharding, FAISS and the vote cost on top.
Goals: embedding stage >= 0.85 x bare forward; warm single-image locate <= 1.25 x one bare forward.
The single-image baseline is a bare forward pass timed right after each locate (same cache and
clock state); the back-to-back figure, where the model runs hot in a tight loop, is printed too.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from geo.models.backbones import load_backbone
from geo.query.index import GeoIndex
from geo.stages.embed import EmbedConfig, run_embedding_stage
from geo.stages.knn import KnnConfig, fit_knn
from geo.store.bundle import Bundle
from geo.store.embeddings import EmbeddingReader


def bare_images_per_s(bb, batch: int, repeats: int) -> float:
    x = torch.randn(batch, 3, bb.preprocess.size, bb.preprocess.size).to(bb.device)
    bb.embed(x)  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        bb.embed(x)
    return batch * repeats / (time.perf_counter() - t)


def bare_single_ms(bb, repeats: int) -> float:
    x = torch.randn(1, 3, bb.preprocess.size, bb.preprocess.size).to(bb.device)
    bb.embed(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        bb.embed(x)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", default="../shared/data/im2gps3k-dev/images")
    ap.add_argument("--n", type=int, default=320)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=-1)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    files = sorted(Path(args.images).glob("*.jpg"))[: args.n]
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"id": [f.stem for f in files], "path": [str(f) for f in files],
                       "lat": rng.uniform(-60, 60, len(files)), "lon": rng.uniform(-180, 180, len(files))})
    bb = load_backbone(args.backbone, device=args.device)
    print(f"backbone {bb.name} on {bb.device} ({bb.dtype}), torch threads {torch.get_num_threads()}, {len(files)} images")

    bare = bare_images_per_s(bb, args.batch, max(2, len(files) // args.batch))
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Bundle.create_or_resume(Path(tmp) / "b", bb.spec(), bb.dim)
        t = time.perf_counter()
        shards, info = run_embedding_stage(bundle, df, bb, EmbedConfig(batch_size=args.batch, workers=args.workers),
                                           progress=False)
        bundle.commit("embeddings", shards, info, replace=("embeddings/",))  # as `geo build-index` records it
        stage = len(files) / (time.perf_counter() - t)
        bare_after = bare_images_per_s(bb, args.batch, max(2, len(files) // args.batch))
        knn_files, knn_info = fit_knn(EmbeddingReader(bundle), KnnConfig(), log=lambda m: None).save(bundle)
        bundle.commit("knn_index", knn_files, knn_info, replace=("index/",))

        index = GeoIndex(bundle, device=args.device)
        index.__dict__["backbone"] = bb  # share the loaded model: the measurement is of locate, not of loading
        index.locate_one(str(files[0]))
        x = torch.randn(1, 3, bb.preprocess.size, bb.preprocess.size).to(bb.device)
        lat_ms, bare_ms = [], []
        for f in files[:40]:  # interleaved: each locate and its baseline see the same cache and clock state
            t = time.perf_counter()
            index.locate_one(str(f), mode="knn")
            lat_ms.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            bb.embed(x)
            bare_ms.append((time.perf_counter() - t) * 1e3)
        single = bare_single_ms(bb, 30)
    bare_mean = (bare + bare_after) / 2
    print(f"bare forward           {bare_mean:8.1f} img/s (batch {args.batch}; before {bare:.1f}, after {bare_after:.1f})")
    print(f"embedding stage        {stage:8.1f} img/s  ratio {stage / bare_mean:.3f}  (goal >= 0.85; {info['ok']} ok)")
    loc, bare1 = statistics.median(lat_ms), statistics.median(bare_ms)
    print(f"bare forward, 1 image  {bare1:8.2f} ms interleaved with the locates ({single:.2f} ms back to back)")
    print(f"warm locate, 1 image   {loc:8.2f} ms   ratio {loc / bare1:.3f} vs interleaved (goal <= 1.25), "
          f"{loc / single:.3f} vs back to back")


if __name__ == "__main__":
    main()
