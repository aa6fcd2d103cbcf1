"""How a region's cells are merged into its drawing: the zero-distance buffer of their MultiPolygon (what
``RegionCells._merged`` does) against ``disjoint_subset_union_all``, on every distinct region of a bundle's
query photos at five coverages: time, the symmetric difference of the two shapes over their area, validity, pieces.

    python benchmarks/bench_region_union.py --index /tmp/r12k/B --queries /tmp/r12k/queries.parquet

(the realistic testbed of benchmarks/bench_gallery_ivf.py's docstring).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import shapely

from geo.query.index import open_index

COVERAGES = (0.5, 0.8, 0.9, 0.95, 0.99)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", required=True)
    ap.add_argument("--queries", required=True, help="query embeddings (an embedding column)")
    args = ap.parse_args()
    emb = np.stack(pq.read_table(args.queries, columns=["embedding"]).column(0).to_numpy(zero_copy_only=False))
    idx = open_index(Path(args.index))
    cells, cmap = idx.cells.region_cells, idx.cells.calibration.get("region")
    fine = idx.cells.fine_probs(emb.astype(np.float32))
    seen, rel, invalid, pieces, took = set(), [], 0, 0, {"buffer": 0.0, "disjoint": 0.0}
    for coverage in COVERAGES:
        for row in fine:
            region = cells.region(row, coverage, cmap)
            key = tuple(tuple(r.tolist()) for r in region.cells)
            if key in seen or not any(len(r) for r in region.cells):
                continue
            seen.add(key)
            polygons = shapely.get_parts([cells._polygon(k, int(r))
                                          for k, rows in enumerate(region.cells) for r in rows])
            t0 = time.perf_counter()
            union = shapely.disjoint_subset_union_all(polygons)
            t1 = time.perf_counter()
            buffered = shapely.multipolygons(polygons).buffer(0)
            took["disjoint"] += t1 - t0
            took["buffer"] += time.perf_counter() - t1
            invalid += not buffered.is_valid
            rel.append(union.symmetric_difference(buffered).area / union.area)
            pieces += len(shapely.get_parts(union)) != len(shapely.get_parts(buffered))
    rel = np.array(rel)
    print(f"{len(rel)} distinct regions of {len(fine)} photos at coverages {COVERAGES}: ms a region, "
          f"buffer(0) {1000 * took['buffer'] / len(rel):.2f}, disjoint_subset_union_all "
          f"{1000 * took['disjoint'] / len(rel):.2f}")
    print(f"symmetric difference / area: median {np.median(rel):.1e}, max {rel.max():.1e}; invalid buffers {invalid}; "
          f"regions with other pieces {pieces}")


if __name__ == "__main__":
    main()
