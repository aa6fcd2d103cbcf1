#!/usr/bin/env bash
# The test command: install geo with test dependencies, then run the offline CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test   # geo and the test extra (the demo installs geo alone)
. .venv/bin/activate
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    echo "no browser: the map-page test (tests/test_serve_browser.py) is skipped; apt-get install chromium chromium-driver runs it"
fi
python -m pytest -m "slow or not slow" "$@"   # the whole suite: fast and slow parts
