#!/usr/bin/env bash
# The main job: install, build an index over the vendored OSV-5M street photos, locate held-out photos.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh        # geo alone: the tests' extra (Ray, the server, selenium) is scripts/test.sh's
. .venv/bin/activate
geo build-index examples/osv5m/gallery.csv --image-root examples/osv5m --out demo-index
geo query examples/osv5m/queries --index demo-index
echo "(66 street photos from 66 places is a tiny gallery: for photos of places it has not seen, the"
echo " answer falls back to where the gallery's photos concentrate. benchmarks/RESULTS.md has real numbers.)"
