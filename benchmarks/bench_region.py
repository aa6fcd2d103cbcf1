"""Time an answer's region (cells, area and GeoJSON shape) per photo, against the cell posterior it is grown from.

    python benchmarks/bench_region.py --index BUNDLE --queries queries.parquet [--n 300] [--coverage 0.9]

Two passes over the same queries: the first also builds the cells' rings and polygons (memoised per bundle),
the second is what a warm server pays. The baseline is the cell posterior itself (``cell_probs``), timed in
the same run.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from geo.data.embedding_table import EmbeddingTable
from geo.query.index import open_index
from geo.stages.fusion.signals import Batch, cell_probs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", required=True)
    ap.add_argument("--queries", required=True, help="a table of query embeddings (as geo query --embeddings)")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--coverage", type=float, default=0.9)
    a = ap.parse_args()
    idx = open_index(a.index)
    emb = next(iter(EmbeddingTable(a.queries, dim=int(idx.bundle.manifest["dim"])).pieces(a.n))).emb
    t0 = time.perf_counter()
    probs = cell_probs(idx.cells, Batch(emb))
    base = time.perf_counter() - t0
    idx.cells.region_cells  # areas and nesting: once per bundle
    print(f"cell posterior (baseline): {1000 * base / len(emb):.2f} ms a photo")
    for name in ("first pass (shapes built)", "second pass (shapes memoised)"):
        t0 = time.perf_counter()
        idx.cells.regions(probs, a.coverage)
        dt = time.perf_counter() - t0
        print(f"region at {a.coverage}, {name}: {1000 * dt / len(emb):.2f} ms a photo ({dt / base:.1f}x the posterior)")


if __name__ == "__main__":
    main()
