#!/usr/bin/env bash
# GPU checks, one script under 8 minutes, for a machine with a CUDA GPU (geo installed, `pip install "geo[gpu]"`
# for FAISS GPU): run from the repository root with the virtualenv active.
#
#   bash benchmarks/bench_gpu.sh            # prints two tables; numbers go into benchmarks/RESULTS.md
#
# 1. Embedding stage images/s against a bare forward pass of the same model and batch in the same run:
#    open_clip ViT-B/32 (random init: no weights are fetched), fp16, batch 256, decode workers, on
#    generated JPEGs (so nothing is downloaded).
# 2. FAISS: build and search 1M x 512 on the GPU against the CPU, in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'EOF'
import os, tempfile, time
import numpy as np
import torch
from PIL import Image

assert torch.cuda.is_available(), "no CUDA device: this script measures GPU paths"
from geo.models.backbones import load_backbone
from geo.stages.embed import EmbedConfig, run_embedding_stage
from geo.store.bundle import Bundle
import pandas as pd

N, BATCH = 4096, 256
tmp = tempfile.mkdtemp(prefix="geo-gpu-")
rng = np.random.default_rng(0)
paths = []
for i in range(64):  # 64 distinct JPEGs reused: decoding cost is real, disk holds little
    p = os.path.join(tmp, f"{i}.jpg")
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(p, quality=90)
    paths.append(p)
bb = load_backbone("open_clip:ViT-B-32", device="cuda", precision="fp16")
x = torch.randn(BATCH, 3, bb.preprocess.size, bb.preprocess.size, device="cuda")
for _ in range(3):
    bb.embed(x)
torch.cuda.synchronize()
t = time.perf_counter()
reps = N // BATCH
for _ in range(reps):
    bb.embed(x)
torch.cuda.synchronize()
bare = reps * BATCH / (time.perf_counter() - t)
df = pd.DataFrame({"id": [str(i) for i in range(N)], "path": [paths[i % 64] for i in range(N)],
                   "lat": np.zeros(N), "lon": np.zeros(N)})
bundle = Bundle.create_or_resume(os.path.join(tmp, "b"), bb.spec(), bb.dim)
t = time.perf_counter()
run_embedding_stage(bundle, df, bb, EmbedConfig(batch_size=BATCH, workers=min(16, os.cpu_count() or 1)), progress=False)
stage = N / (time.perf_counter() - t)
print(f"| embedding stage img/s | bare forward img/s | ratio |\n|---|---|---|\n| {stage:.0f} | {bare:.0f} | {stage / bare:.3f} |")
EOF
python - <<'EOF'
import time
import faiss
import numpy as np

assert faiss.get_num_gpus() > 0, "FAISS has no GPU: pip uninstall faiss-cpu && pip install faiss-gpu-cu12"
n, d, nq, k = 1_000_000, 512, 10_000, 10
rng = np.random.default_rng(0)
xb = rng.standard_normal((n, d), dtype=np.float32)
faiss.normalize_L2(xb)
xq = xb[rng.choice(n, nq, replace=False)] + 0.01 * rng.standard_normal((nq, d), dtype=np.float32)
rows = []
for where in ("cpu", "gpu"):
    for factory in ("Flat", "IVF4096,Flat"):
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        if where == "gpu":
            index = faiss.index_cpu_to_all_gpus(index)
        t = time.perf_counter()
        if not index.is_trained:
            index.train(xb[rng.choice(n, 262_144, replace=False)])
        index.add(xb)
        build = time.perf_counter() - t
        if factory.startswith("IVF"):
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", 32) if where == "gpu" else \
                faiss.ParameterSpace().set_index_parameter(index, "nprobe", 32)
        t = time.perf_counter()
        index.search(xq, k)
        search = time.perf_counter() - t
        rows.append((where, factory, build, nq / search))
print("| where | index | build s | queries/s |\n|---|---|---|---|")
for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.0f} |")
EOF
