#!/usr/bin/env bash
# `geo finetune` on a CUDA GPU, one script: the CUDA tests, then one real fine-tuning run, timed.
#
#   bash benchmarks/gpu_finetune.sh DATA_DIR OUT_DIR
#
# DATA_DIR holds gallery.csv (path, lat, lon, AUTHOR; paths relative to it) and its photos: prepare it with
# `python benchmarks/gpu_finetune.py prepare --bundle /tmp/new-dev --out DATA_DIR` (fold 0's gallery of the
# Im2GPS3k dev folds that benchmarks/eval_finetune.py uses, photos shrunk to 320 px so they travel).
# Run the same run on the CPU with `python benchmarks/gpu_finetune.py run DATA_DIR OUT --device cpu` for
# the ratio. What it checks on the GPU:
#   1. tests/test_backbones.py's CUDA test (fp16 embeddings match fp32 on the CPU);
#   2. tests/test_finetune.py's training and resume tests with device auto (= cuda: bf16 autocast);
#   3. a 6-epoch fine-tune of the offline lite0 with eval_finetune.py's settings: wall time and validation;
#   4. a sweep of settings around it (gpu_finetune.py sweep), each one's best held-out kNN score.
set -uo pipefail
data=$1
out=$2
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pytest -p no:cacheprovider -q -p no:warnings -rA tests/test_backbones.py tests/test_finetune.py \
    -k "cuda or lowers or resumed" 2>&1 | grep -E "PASSED|FAILED|ERROR|passed|failed|^E " | head -30
PYTHONUNBUFFERED=1 python3 benchmarks/gpu_finetune.py run "$data" /tmp/geo-run --device cuda 2>&1 | grep "^{"
PYTHONUNBUFFERED=1 python3 benchmarks/gpu_finetune.py sweep "$data" /tmp/geo-sweep --device cuda 2>&1 | grep "^{"
