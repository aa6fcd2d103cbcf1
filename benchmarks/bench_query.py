"""Warm single-image latency: each query mode against kNN-only, or one mode's query broken down by part.

    python benchmarks/bench_query.py --index /tmp/dev-all --images ../shared/data/im2gps3k-dev/images
    python benchmarks/bench_query.py --index B --images examples/osv5m/queries --parts [--mode fused]

Goal (issue 5): a fused query costs at most 10 % more than a kNN-only one on the default backbone.
Both include decoding and the forward pass, as a user's `locate_one(path)` does; the modes are
interleaved photo by photo so machine load affects them alike.

``--parts`` (issue 25): the query's own time split into decode, forward, the kNN and gallery searches,
decide, cells, the region, country, places, neighbours and the rest (building the answer), each by the
functions that do it (a part's own time: one called inside another is taken out of the outer one, so
nothing is counted twice), against a bare forward pass of the same photo's pixels timed
right before or right after each query, by turns (geo's forward: channels-last, its BatchNorms folded into the
convolutions; the one of the two that runs second finds the network's weights in cache, so the order alternates
from photo to photo, and neither always has that advantage), the same
network as a user of timm runs it (:func:`plain_network`: timm's own for the default backbone, in the default
NCHW layout: channels-last was 13-27 % faster here, the folding another 21-38 %), and the answer alone
(``locate_embeddings`` on that forward's embedding). Goal:
warm ``locate_one`` <= 1.25x the bare forward, the answer's assembly (everything but decode and forward)
<= 3 ms. The median wall time, the median CPU time (``process_time``,
which leaves out time spent descheduled, but counts torch's worker threads spinning after the forward) and
the least wall time over the photos (on a shared machine, the closest to what the part costs alone).
"""
from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import time
from typing import Any, Callable
from collections import defaultdict
from pathlib import Path

import torch

import geo
import geo.query.index as query_index
from geo.data.images import ImageDataset
from geo.models.efficientnet_lite import EfficientNetLite0
from geo.query.index import GeoIndex
from geo.stages.cells.cities import CityHead
from geo.stages.cells.predictor import CellPredictor
from geo.stages.gallery.stage import GpsGallery
from geo.stages.knn import KnnIndex

PARTS = {  # part -> the (owner, attribute) functions that do it
    "decode": [(ImageDataset, "__getitem__")],
    "forward": [(GeoIndex, "embed_tensors")],
    "knn search": [(KnnIndex, "search")],
    "gallery search": [(GpsGallery, "search")],
    "decide": [(GeoIndex, "_decide")],
    "cells": [(CellPredictor, "fine_probs"), (CellPredictor, "top_cells")],
    "region": [(CellPredictor, "regions")],
    "country": [(query_index, "country_index"), (GeoIndex, "_countries")],
    "places": [(query_index, "nearest_places"), (query_index, "city_label"), (CityHead, "answer_cities")],
    "neighbours": [(GeoIndex, "_neighbours")],
}


class PartClock:
    """Wraps the functions of :data:`PARTS` with a clock: wall and CPU seconds per part, each part's own time (a
    part called inside another, such as the gallery search inside decide, is taken out of the outer one)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self._open: list[tuple[str, list[float]]] = []  # parts running now, outermost first, with their inner time
        self._saved: list[tuple[object, str, object]] = []

    def __enter__(self) -> "PartClock":
        for part, funcs in PARTS.items():
            for owner, name in funcs:
                fn = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
                self._saved.append((owner, name, fn))
                setattr(owner, name, self._timed(part, fn))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, fn in reversed(self._saved):
            setattr(owner, name, fn)

    def reset(self) -> None:
        self.wall.clear()
        self.cpu.clear()

    def row(self, total: tuple[float, float]) -> dict[str, tuple[float, float]]:
        """(wall, CPU) seconds of each part since :meth:`reset`, and the ``rest`` of ``total`` that no part took."""
        row = {p: (self.wall[p], self.cpu[p]) for p in PARTS}
        row["rest"] = tuple(t - sum(row[p][k] for p in PARTS) for k, t in enumerate(total))
        return row

    def _timed(self, part: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if any(p == part for p, _ in self._open):  # a part within itself counts once
                return fn(*args, **kwargs)
            inner = [0.0, 0.0]
            self._open.append((part, inner))
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                self._open.pop()
                self.wall[part] += wall - inner[0]
                self.cpu[part] += cpu - inner[1]
                if self._open:
                    outer = self._open[-1][1]
                    outer[0] += wall
                    outer[1] += cpu
        return timed


def by_mode(index: GeoIndex, files: list[str]) -> None:
    modes = index.modes
    for m in modes:  # warm: model, heads, gallery, caches
        index.locate_one(files[0], mode=m)
    times = {m: [] for m in modes}
    for f in files:
        for m in modes:
            t = time.perf_counter()
            index.locate_one(f, mode=m)
            times[m].append((time.perf_counter() - t) * 1e3)
    knn = statistics.median(times["knn"])
    print(f"{len(files)} photos, warm, median ms per locate_one(path):")
    for m in modes:
        med = statistics.median(times[m])
        print(f"  {m:8s} {med:8.2f} ms   x{med / knn:.3f} of knn")


def _timed(fn: Callable[[], Any]) -> tuple[Any, tuple[float, float]]:
    """``fn()`` and its (wall, CPU) seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, (time.perf_counter() - wall, time.process_time() - cpu)


def plain_network(model: torch.nn.Module) -> torch.nn.Module:
    """The model as a user of timm runs it: the same weights, its BatchNorms, the default (NCHW) layout. For the
    default backbone, timm's own ``tf_efficientnet_lite0``, whose "SAME" padding copies the input of each
    stride-2 convolution (geo's depthwise ones do not)."""
    if isinstance(model, EfficientNetLite0):
        import timm

        net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
        net.load_state_dict(model.state_dict())
        return net.to(next(model.parameters()).dtype).eval()
    return copy.deepcopy(model).to(memory_format=torch.contiguous_format).eval()


def by_part(index: GeoIndex, files: list[str], mode: str | None) -> None:
    bb = index.backbone
    plain = plain_network(bb.model)
    decoded = ImageDataset(files, bb.preprocess)
    pixels = [t.reshape(-1, *t.shape[-3:]) for _, t, _ in (decoded[i] for i in range(len(files)))]
    rows: list[dict[str, tuple[float, float]]] = []
    with PartClock() as clock:
        for n, (f, x) in enumerate([(files[0], pixels[0])] + list(zip(files, pixels))):  # the first warms up
            got: dict[str, tuple[float, float]] = {}
            for name in ("query", "bare forward") if n % 2 else ("bare forward", "query"):  # see the docstring
                if name == "query":
                    clock.reset()
                    _, got[name] = _timed(lambda: index.locate_one(f, mode=mode))
                    row = clock.row(got[name])
                else:
                    emb, got[name] = _timed(lambda: bb.embed(x))
            with torch.inference_mode():
                _, got["plain NCHW forward"] = _timed(lambda: plain(x.to(bb.dtype)))
            # the answer alone, from the embedding, once more
            _, row["answer from embedding"] = _timed(lambda: index.locate_embeddings(emb, mode=mode))
            row["assembly"] = tuple(t - row["decode"][k] - row["forward"][k] for k, t in enumerate(got["query"]))
            rows.append(row | got)
    rows = rows[1:]
    med = {name: [statistics.median(r[name][k] * 1e3 for r in rows) for k in (0, 1)] for name in rows[0]}
    least = {name: min(r[name][0] * 1e3 for r in rows) for name in rows[0]}
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{len(rows)} photos, warm locate_one(path, mode={mode or index.default_mode}), ms; load average {load}")
    print("| part | median wall | median cpu | least wall |\n|---|---|---|---|")
    for name in [*PARTS, "rest", "assembly", "answer from embedding", "query", "bare forward", "plain NCHW forward"]:
        print(f"| {name} | {med[name][0]:.2f} | {med[name][1]:.2f} | {least[name]:.2f} |")
    for base in ("bare forward", "plain NCHW forward"):
        ratios = [r["query"][0] / r[base][0] for r in rows]
        print(f"query / {base}: median {statistics.median(ratios):.3f} (wall, photo by photo)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", required=True)
    ap.add_argument("--images", default="../shared/data/im2gps3k-dev/images")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--parts", action="store_true", help="one mode's query by part, against the bare forward")
    ap.add_argument("--mode", default=None, help="with --parts: the mode (default: the bundle's)")
    args = ap.parse_args()
    index = geo.open_index(args.index)
    files = [str(f) for f in sorted(Path(args.images).glob("*.jpg"))[: args.n]]
    if args.parts:
        by_part(index, files, args.mode)
    else:
        by_mode(index, files)


if __name__ == "__main__":
    main()
