"""A bundle's stages seen through a query-time constraint (:class:`geo.data.constraint.Constraint`).

A hard constraint restricts before anything is decided, in two steps. The searches look only inside: kNN and
the GPS gallery through a FAISS ID selector over the photos and points inside (so a photo constrained to a
small country still gets its full k neighbours there, not the few of the world's top k that happen to lie
in it), the cells' posterior renormalised over the cells that keep a photo spot inside, with decisions among
those spots, and the prior over the photos inside (:func:`stages_within`). Then every support point of the
evidence fusion decides over (which are also its candidates) is tested, and those outside are dropped
(:func:`restrict_evidence`): a cell's centre or a prior point can lie outside the area its photos are in.
Every answer and alternative is therefore a point inside.

A soft constraint (``weight`` in (0, 1)) keeps the searches as they are and multiplies each signal's mass
outside by the weight before fusion mixes them (a temperature-scaled score gets ``T log w`` added, which is
the same factor after its softmax): the mixture leans inside and still answers outside when the photo says
so clearly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from geo.data.constraint import Constraint, ConstraintError
from geo.stages.fusion.posterior import FusionParams
from geo.stages.fusion.signals import Evidence, SignalEvidence, SignalSource, SignalSpec, sources_for


@dataclass
class StagesWithin:
    """The stages a hard constraint leaves (searches restricted to the inside) and fusion's sources over them."""

    knn: Any  # geo.stages.knn.KnnIndex
    cells: Any | None  # geo.stages.cells.predictor.CellPredictor
    gallery: Any | None  # geo.stages.gallery.stage.GpsGallery
    sources: list[SignalSource]


def stages_within(constraint: Constraint, knn: Any, cells: Any | None, gallery: Any | None) -> StagesWithin:
    """The stages searched only inside ``constraint``; a :class:`ConstraintError` when no gallery photo is
    inside (nothing could be answered there)."""
    inside = constraint.contains(knn.lat, knn.lon)
    if not inside.any():
        raise ConstraintError(f"no gallery photo inside {constraint.label()}; this bundle's {len(inside):,} photos "
                              "all lie outside it: widen the constraint or query a bundle that covers it")
    rows = np.flatnonzero(inside)
    knn_in = knn.within(rows)
    gallery_in = None if gallery is None else gallery.within(
        np.flatnonzero(constraint.contains(gallery.points[:, 0], gallery.points[:, 1])))
    cells_in = None if cells is None else cells.within(
        constraint.contains(cells.spots["lat"].astype(float), cells.spots["lon"].astype(float)))
    return StagesWithin(knn_in, cells_in, gallery_in,
                        sources_for(knn_in, cells_in, gallery_in, knn.lat[rows], knn.lon[rows]))


def restrict_evidence(ev: Evidence, constraint: Constraint, params: FusionParams | None) -> Evidence:
    """Every signal's support points tested against ``constraint``: hard, those outside become padding (the
    inside ones moved to the front, in order, so a signal's top-K counts points that exist); soft, their mass
    is multiplied by the weight (``params`` gives the temperature a "logits" signal is softmaxed with)."""
    pts = ev.points  # one test for every signal's points (a country's test has a cost per call)
    inside = constraint.contains(pts[..., 0].ravel(), pts[..., 1].ravel()).reshape(pts.shape[:2])
    out = {}
    for spec, block in zip(ev.specs, ev.blocks()):
        e = ev.signals[spec.name]
        out[spec.name] = (_dropped(e, inside[:, block], spec) if constraint.hard
                          else _weighed(e, inside[:, block], spec, params, constraint.weight))
    return Evidence(ev.specs, out)


def _dropped(e: SignalEvidence, inside: np.ndarray, spec: SignalSpec) -> SignalEvidence:
    order = np.argsort(~inside, axis=1, kind="stable")
    kept = np.take_along_axis(inside, order, axis=1)
    latlon = np.take_along_axis(e.latlon, order[..., None], axis=1)
    score = np.take_along_axis(e.score, order, axis=1)
    return SignalEvidence(np.where(kept[..., None], latlon, np.nan),
                          np.where(kept, score, -np.inf if spec.kind == "logits" else 0.0))


def _weighed(e: SignalEvidence, inside: np.ndarray, spec: SignalSpec, params: FusionParams | None,
             weight: float) -> SignalEvidence:
    if spec.kind == "logits":
        fitted = params.signals.get(spec.name) if params is not None else None
        temperature = fitted.temperature if fitted is not None else spec.default_temperature
        return SignalEvidence(e.latlon, np.where(inside, e.score, e.score + temperature * np.log(weight)))
    return SignalEvidence(e.latlon, np.where(inside, e.score, e.score * weight))
