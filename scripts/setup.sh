#!/usr/bin/env bash
# Create .venv (once) and install geo with its pinned dependencies; offline apart from the package index.
#   bash scripts/setup.sh            # what geo itself needs (the demo)
#   bash scripts/setup.sh test       # and the test extra (Ray, the server, selenium): scripts/test.sh
# torch and torchvision come from the package index as usual. On a machine without an NVIDIA GPU,
# GEO_TORCH_INDEX=https://download.pytorch.org/whl/cpu installs PyTorch's CPU wheels at the pinned versions
# (about 0.2 GB instead of several GB of CUDA libraries). Not the default: nothing is fetched from a host
# the user did not name, and offline machines (CI included) reach only their package index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${1:-}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
TORCH_INDEX=${GEO_TORCH_INDEX:-}
if [ -n "$TORCH_INDEX" ] && [ "$TORCH_INDEX" != none ]; then
    # the versions pyproject pins; "==2.14.1" also matches the CPU wheel "2.14.1+cpu"
    pins=$(python - <<'PY'
import re
text = open("pyproject.toml").read()
print(" ".join(re.findall(r'"((?:torch|torchvision)==[^"]+)"', text)))
PY
)
    python -m pip install -q $pins --extra-index-url "$TORCH_INDEX"
fi
python -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
