#!/usr/bin/env bash
# Build time of the 66-photo demo and the 671-photo Im2GPS3k dev sample, and fusion's share of it, for one
# checkout of geo (TREE, default this one), written to OUT/<tag>.times. Run it for two checkouts in turn
# (e.g. a `git worktree` of an older commit) to compare them on the same machine in the same run:
#
#   TREE=/path/to/old TAG=before bash benchmarks/bench_build.sh
#   TAG=after bash benchmarks/bench_build.sh
#
# Each build is timed as a whole process. Fusion's share is measured the same way for any version:
# a re-run with nothing to do (start-up, model load, manifest) and a re-run with `--force fusion`;
# share = (fusion re-run - idle re-run) / full build.
set -u
command -v geo >/dev/null || { echo "bench_build.sh: no geo command: activate the virtualenv first (. .venv/bin/activate)" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")/.." && pwd)
TREE=${TREE:-$HERE}
TAG=${TAG:-build}
OUT=${OUT:-/tmp/geo-bench-build}
DATA=${DATA:-$HERE/../shared/data/im2gps3k-dev}
mkdir -p "$OUT"
export PYTHONPATH=$TREE
cd "$TREE"
t() {
  local s e rc
  s=$(date +%s.%N); "$@" > "$OUT/$TAG.$LBL.log" 2>&1; rc=$?; e=$(date +%s.%N)
  echo "$LBL rc=$rc $(echo "$e - $s" | bc) s load=$(cut -d' ' -f1 /proc/loadavg)" >> "$OUT/$TAG.times"
}
rm -rf "$OUT/$TAG-demo" "$OUT/$TAG-dev"
LBL=demo_full t geo build-index examples/osv5m/gallery.csv --image-root examples/osv5m --out "$OUT/$TAG-demo" -q
LBL=demo_idle t geo build-index examples/osv5m/gallery.csv --image-root examples/osv5m --out "$OUT/$TAG-demo" -q
LBL=demo_fusion t geo build-index examples/osv5m/gallery.csv --image-root examples/osv5m --out "$OUT/$TAG-demo" -q --force fusion
LBL=dev_full t geo build-index "$DATA/im2gps3k_places365.csv" --image-root "$DATA/images" --out "$OUT/$TAG-dev" -q
LBL=dev_idle t geo build-index "$DATA/im2gps3k_places365.csv" --image-root "$DATA/images" --out "$OUT/$TAG-dev" -q
LBL=dev_fusion t geo build-index "$DATA/im2gps3k_places365.csv" --image-root "$DATA/images" --out "$OUT/$TAG-dev" -q --force fusion
awk -v tag="$TAG" '{split($0, a, " "); t[a[1]] = a[3]} END {
  for (s in t) {}
  printf "%s demo: full %.1f s, fusion %.1f s (%.0f%%)\n", tag, t["demo_full"], t["demo_fusion"] - t["demo_idle"],
         100 * (t["demo_fusion"] - t["demo_idle"]) / t["demo_full"]
  printf "%s dev:  full %.1f s, fusion %.1f s (%.0f%%)\n", tag, t["dev_full"], t["dev_fusion"] - t["dev_idle"],
         100 * (t["dev_fusion"] - t["dev_idle"]) / t["dev_full"] }' "$OUT/$TAG.times"
