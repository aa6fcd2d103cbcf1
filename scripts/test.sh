#!/usr/bin/env bash
# The test command: install geo with test dependencies, then run the offline CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest "$@"
