"""Give a bundle the cells stage's current region map, without refitting the heads (a measurement shortcut): a bundle
built before region maps, or before their confidence bins.

    python benchmarks/add_region_map.py BUNDLE [--group AUTHOR]

`geo build-index --force cells` makes the same map but refits the heads, tables and temperatures first (the same
ones, from the same data and seed): on a 2-core machine shared by others, tens of minutes for 10,500 photos. This
computes the map with the stage's own function (`_region_map`) on the held-out photographers (the pipeline's
`validation_mask`) and saves and commits the cells stage under the write lock, as `geo.pipeline` does."""
from __future__ import annotations

import argparse
from types import SimpleNamespace

import numpy as np

from geo.core.splits import validation_mask
from geo.models.heads import head_logits
from geo.stages.cells.partition import locate, partitions_from_tables
from geo.stages.cells.predictor import CellPredictor
from geo.stages.cells.region import map_summary
from geo.stages.cells.stage import _region_map, region_rows_of
from geo.store.bundle import open_bundle
from geo.store.embeddings import EmbeddingReader
from geo.store.lock import writing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--group", default="AUTHOR", help="the photographer column the bundle was built with")
    a = ap.parse_args()
    b = open_bundle(a.bundle)
    pred = CellPredictor.load(b)
    meta, emb = EmbeddingReader(b).read()
    val = np.flatnonzero(validation_mask(len(emb), meta[a.group].astype(str).to_numpy(), 0.2, 0))
    if len(val) != b.stage("cells")["train"]["val_photos"]:
        raise SystemExit(f"{a.bundle}: these are not the photographers its heads held out")
    rows = locate(partitions_from_tables(pred.tables, pred.names), meta["lat"], meta["lon"])
    cells = SimpleNamespace(rows=rows, all_rows=rows, tables=pred.tables,
                            parts=[SimpleNamespace(name=n) for n in pred.names])
    rows_fit = region_rows_of(val)  # the photos the cells stage fits its map on
    logits, _ = head_logits(pred.model, emb[rows_fit], None)
    groups = meta[a.group].astype(str).to_numpy()
    pred.calibration["region"] = _region_map(cells, logits, rows_fit, pred.parents, pred.calibration, groups)
    pred.info["calibration"] = {**pred.info["calibration"], "region": map_summary(pred.calibration["region"])}
    print(pred.info["calibration"]["region"])
    with writing(b.root):
        files, info = pred.save(b)
        b.commit("cells", files, info, replace=("cells/", "heads/"))


if __name__ == "__main__":
    main()
