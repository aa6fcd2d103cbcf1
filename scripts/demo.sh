#!/usr/bin/env bash
# The main job: install, build an index over the vendored OSV-5M street photos, locate held-out photos.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
geo build-index examples/osv5m/gallery.csv --image-root examples/osv5m --out demo-index
geo query examples/osv5m/queries --index demo-index
