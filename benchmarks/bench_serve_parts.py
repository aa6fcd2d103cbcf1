"""Where a served batch's time goes: the model thread's work on one batch, part by part, against its forward pass.

    python benchmarks/bench_serve_parts.py --bundle /tmp/srv/bundle --images /work/shared/data/osv5m-sample/images

`geo serve` runs a batch on its model thread as decode and preprocess, one forward pass, then
``GeoIndex.locate_embeddings`` (FAISS, fusion, places, countries, cities, regions, the answers); the event
loop then turns the answers into JSON. This script times each of those on batches of --batch photos in
one process (the same calls on a fresh ``Batch``, so nothing is memoised from the full call), medians over
--repeats batches of different photos, and prints ms a photo. "rest of locate" is the full
``locate_embeddings`` less its timed parts: top cells, neighbours, the Answer records. Wall and CPU time are
both given: on a shared machine the CPU time of this process's threads is the steadier of the two.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from geo.data.countries import country_index
from geo.data.images import decode_tensor, expand_images
from geo.data.places import nearest_places
from geo.core.plain import json_safe
from geo.query.index import open_index
from geo.stages.fusion.signals import Batch, cell_probs, gallery_search, knn_search


def one_batch(idx: Any, blobs: list[tuple[str, bytes]], mode: str, coverage: float) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds of each part for one batch of uploads (CPU: every thread of this process, torch's and
    FAISS's workers too: what the part takes from the cores a server's forward pass needs)."""
    took: dict[str, tuple[float, float]] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        took[name] = (time.perf_counter() - t0, time.process_time() - c0)
        return out

    pre = idx.backbone.preprocess
    tensors = timed("decode + preprocess", lambda: [decode_tensor(d, n, pre) for n, d in blobs])
    emb = np.stack(timed("forward", lambda: idx.embed_tensors(tensors)))
    answers = timed("locate_embeddings (all)", lambda: idx.locate_embeddings(emb, mode=mode, coverage=coverage))
    timed("JSON (to_dict, json_safe, dumps)", lambda: json.dumps(json_safe([a.to_dict() for a in answers])))
    batch = Batch(emb, 50)
    sims, rows = timed("  FAISS kNN search", lambda: knn_search(idx.knn, batch))
    probs = timed("  cell posterior (heads)", lambda: cell_probs(idx.cells, batch)) if idx.cells else None
    if idx.gallery is not None and mode in ("gallery", "fused"):
        timed("  GPS gallery search", lambda: gallery_search(idx.gallery, batch))
    decisions = timed("  decide (fusion)", lambda: idx._decide(mode, batch, sims, rows))
    lat, lon = np.array([d.lat for d in decisions]), np.array([d.lon for d in decisions])
    timed("  places", lambda: nearest_places(lat, lon))
    timed("  countries", lambda: idx._countries(country_index(lat, lon), probs))
    timed("  cities (head)", lambda: idx._cities(batch.emb, len(decisions)))
    if probs is not None:
        timed("  regions", lambda: idx.cells.regions(probs, coverage))
    parts = [v for k, v in took.items() if k.startswith("  ")]
    took["  rest of locate"] = tuple(a - sum(p[i] for p in parts) for i, a in enumerate(took["locate_embeddings (all)"]))
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--mode", default=None)
    ap.add_argument("--coverage", type=float, default=0.9)
    args = ap.parse_args()
    idx = open_index(args.bundle)
    idx.load_stages()
    mode = args.mode or idx.default_mode
    photos = expand_images([str(args.images)])
    blobs = [(Path(p).name, Path(p).read_bytes()) for p in photos]
    batches = [[blobs[(r * args.batch + i) % len(blobs)] for i in range(args.batch)] for r in range(args.repeats + 1)]
    load = [os.getloadavg()[0]]
    runs = [one_batch(idx, b, mode, args.coverage) for b in batches][1:]  # the first warms every part
    load.append(os.getloadavg()[0])
    ms = {k: [1000 * statistics.median(r[k][i] for r in runs) / args.batch for i in (0, 1)] for k in runs[0]}
    print(f"{args.batch} photos a batch, median of {args.repeats} batches, mode {mode}, torch threads "
          f"{torch.get_num_threads()}, load average {load[0]:.2f} before, {load[1]:.2f} after\n")
    print("| part | wall ms a photo | CPU ms a photo | CPU / forward's |\n|---|---|---|---|")
    for k, (wall, cpu) in ms.items():
        print(f"| {k} | {wall:.2f} | {cpu:.2f} | {cpu / ms['forward'][1]:.1%} |")
    answer = [ms["locate_embeddings (all)"][i] + ms["JSON (to_dict, json_safe, dumps)"][i] for i in (0, 1)]
    base = [ms["forward"][i] + ms["decode + preprocess"][i] for i in (0, 1)]
    print(f"\nanswer (locate_embeddings + JSON) over decode + forward: wall {answer[0] / base[0]:.1%}, "
          f"CPU {answer[1] / base[1]:.1%}")


if __name__ == "__main__":
    main()
