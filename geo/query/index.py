"""GeoIndex: a loaded bundle that answers "where was this photo taken?".

The CLI (and any server) is a thin layer over this class, so scripts get the
same answers as ``geo query``. It loads each stage's artifact once (the
backbone only on the first call that needs pixels, so scoring stored
embeddings never pays for it), computes the signals a mode needs for a batch
(:mod:`geo.stages.fusion.signals`) and builds every :class:`~geo.core.answer.Answer`
in one place, abstention included.
"""
from __future__ import annotations

import copy
import glob
import os
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from itertools import accumulate
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import torch
from safetensors import SafetensorError

from geo.core.answer import PRIOR_ONLY, Answer
from geo.core.files import on_disk
from geo.core.geodesy import THRESHOLDS_KM, haversine_km
from geo.core.knn_vote import KnnParams, kde_vote, neighbour_weights
from geo.core.progress import bar
from geo.core.runtime import one_row_threads
from geo.data.embedding_table import EmbeddingTable
from geo.data.images import ImageDataset, expand_images
from geo.data.constraint import Constraint
from geo.data.countries import country_codes, country_index, country_names
from geo.data.places import city_label, city_points, nearest_places
from geo.models.backbones import Backbone, BackboneError, backbone_from_spec
from geo.query.trip import Travel, Trips, locate_trips, trips_from_photos, trips_from_table
from geo.stages.cells.predictor import CellPredictor
from geo.stages.cells.region import DEFAULT_COVERAGE
from geo.stages.cells.support import DECISION_RADII_KM
from geo.stages.fusion.calibration import CALIBRATED_KM, calibrated
from geo.stages.fusion.posterior import FusionParams, decide, mass_near, near_duplicate
from geo.stages.fusion.signals import (
    BACKOFF_SIGNAL,
    DUPLICATE_SIGNAL,
    Batch,
    Evidence,
    SignalSource,
    cell_probs,
    collect,
    gallery_search,
    knn_search,
    sources_for,
)
from geo.stages.fusion.stage import FusionModel
from geo.stages.gallery.stage import GpsGallery
from geo.stages.knn import KnnIndex
from geo.stages.within import restrict_evidence, stages_within
from geo.store.bundle import MANIFEST, Bundle, BundleError, open_bundle, read_json
from geo.store.lock import writer_active

MODES = ("fused", "knn", "gallery", "cells", "regression")
VIEWS_KEPT = 8  # constrained views of one index kept (a server sees the same few constraints again and again)
GALLERY_SHOWN = 5
TOP_CELLS_SHOWN = 5


@dataclass
class _Decision:
    """What a mode decides for one query; the rest of the answer is the evidence, the same for every mode."""

    lat: float
    lon: float
    confidence: float
    radius_km: float
    p_within: dict[str, float] = field(default_factory=dict)
    alternatives: list[dict[str, float]] = field(default_factory=list)
    shares: dict[str, float] = field(default_factory=dict)  # what carried the answer (the mode's own signal: 1.0)
    basis: str = "image"
    trip: dict[str, Any] = field(default_factory=dict)  # how its trip placed it (geo.query.trip); {} without --trip


def _p_within(mass: dict[str, float], maps: dict[str, dict[str, list[float]]], duplicate: bool) -> dict[str, float]:
    """Calibrated probabilities within 25/200/750 km. A near-duplicate is answered at its twin's spot, and
    build-time calibration never saw one (it scores other photographers' photos): its mass stands as it is."""
    return {t: round(mass[t], 4) for t in CALIBRATED_KM} if duplicate else calibrated(mass, maps)


def open_index(path: str | Path, device: str = "auto", verify: bool = True, settle_s: float = 30.0) -> "GeoIndex":
    """Open an index bundle built by ``geo build-index``: file sizes checked (``geo info --verify`` hashes
    them), an unfinished build refused, and every stage's files read at once, so all come from one manifest.

    While another process holds the bundle's write lock, a file that no longer matches the manifest is most
    likely a stage being committed: the bundle is read again (for up to ``settle_s``) instead of being called
    damaged, so a reader sees the old bundle or the new one, never a false alarm.

    Use::

        index = open_index("my-index")
        answer = index.locate_one("holiday.jpg")                # one photo: one Answer
        answers = index.locate(["trip/", "a.jpg"], mode="knn")  # always a list, one Answer per photo found
    """
    deadline = time.monotonic() + settle_s
    while True:
        before = _updated(path)
        try:
            bundle = open_bundle(path, verify=verify)
            bundle.require_complete()
            index = GeoIndex(bundle, device=device)
            index.load_stages()
            if verify and _updated(path) != bundle.manifest.get("updated"):
                raise BundleError(f"{bundle.root}: the bundle changed while it was being read; try again")
            return index
        except BundleError:
            # a writer at work, or one that committed and finished while we read: read the new bundle
            moved = _updated(path) != before
            if time.monotonic() > deadline or not (moved or writer_active(path)):
                raise
            time.sleep(0.2)


def _matches_nothing(arg: str) -> bool:
    """Whether an argument that :func:`expand_images` kept as given names no photo: a folder without images
    or a glob that matched nothing (a missing plain path is still one photo, answered with its error)."""
    path = on_disk(arg)
    return os.path.isdir(path) or (glob.has_magic(arg) and not os.path.exists(path))


def _updated(path: str | Path) -> str | None:
    """When the manifest was last committed (None when it cannot be read right now)."""
    try:
        return read_json(Path(path) / MANIFEST).get("updated")
    except (BundleError, AttributeError):
        return None


# What a damaged or foreign stage file raises from the readers the stages use: the OS (OSError), parsers and
# shape checks (ValueError, JSON's and pyarrow's ArrowInvalid among them; KeyError for a missing field),
# pyarrow (every ArrowException, ArrowTypeError included: a foreign Parquet file's column types) and
# safetensors. Anything else (AttributeError, TypeError, NameError, ...) is a defect in geo and goes through.
_FILE_ERRORS = (OSError, ValueError, KeyError, pa.ArrowException, SafetensorError)


def _damaged_file(e: Exception) -> bool:
    """Whether ``e`` is what reading a damaged or foreign file raises. FAISS reports a bad index as a plain
    RuntimeError whose message names the faiss:: reader, so that one is recognised by its message."""
    return isinstance(e, _FILE_ERRORS) or (isinstance(e, RuntimeError) and "faiss::" in str(e))


def _loading(bundle: Bundle, stage: str, load: Callable[[], Any]) -> Any:
    """A stage's artifact, or a BundleError naming the stage when its files do not parse (a checksum that was
    updated along with the file passes the manifest's check; the reader still must not crash). Only errors
    that a damaged file raises become "rebuild that stage": a programming error keeps its own traceback."""
    try:
        return load()
    except BundleError:
        raise
    except Exception as e:
        if not _damaged_file(e):
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        raise BundleError(f"{bundle.root}: the {stage} stage's files cannot be read ({type(e).__name__}: {first}); "
                          f"rebuild that stage: geo build-index ... --out {bundle.root} --force {stage}") from None


class GeoIndex:
    def __init__(self, bundle: Bundle, device: str = "auto"):
        self.bundle = bundle
        self.device = device
        self.knn = _loading(bundle, "knn_index", lambda: KnnIndex.load(bundle))
        self.knn_params = KnnParams()
        self.constraint: Constraint | None = None  # set on a view of the index through one (see through)
        self._views: dict[str, GeoIndex] = {}
        self._views_lock = threading.Lock()

    def load_stages(self) -> None:
        """Read every built stage now (each is otherwise read on first use)."""
        for artifact in ("cells", "gallery", "fusion"):
            getattr(self, artifact)

    # ------------------------------------------------------------ the bundle's artifacts
    @cached_property
    def backbone(self) -> Backbone:
        spec = self.bundle.manifest["backbone"]
        if spec.get("weights", {}).get("kind") == "unavailable":
            raise BackboneError(f"{self.bundle.root}: built from precomputed embeddings of {spec['name']!r}, a model "
                                f"that could not be loaded ({spec['weights'].get('reason')}); query it with "
                                "`geo query --embeddings`, or rebuild with a --backbone this machine can load")
        return backbone_from_spec(spec, device=self.device)

    @cached_property
    def cells(self) -> CellPredictor | None:
        return _loading(self.bundle, "cells", lambda: CellPredictor.load(self.bundle)) \
            if self.bundle.has_stage("cells") else None

    @cached_property
    def gallery(self) -> GpsGallery | None:
        return _loading(self.bundle, "gallery", lambda: GpsGallery.load(self.bundle)) \
            if self.bundle.has_stage("gallery") else None

    @cached_property
    def fusion(self) -> FusionModel | None:
        return _loading(self.bundle, "fusion", lambda: FusionModel.load(self.bundle)) \
            if self.bundle.has_stage("fusion") else None

    @cached_property
    def sources(self) -> list[SignalSource]:
        """The signals fusion mixes, from the stages this bundle has."""
        return sources_for(self.knn, self.cells, self.gallery, self.knn.lat, self.knn.lon)

    @cached_property
    def modes(self) -> list[str]:
        """Modes this bundle can answer in (stages that were built; read once, as the stages are)."""
        have = {"knn", *(m for m, s in (("cells", "cells"), ("gallery", "gallery"), ("fused", "fusion"))
                         if self.bundle.has_stage(s))}
        if self.bundle.has_stage("cells") and "regression" in self.bundle.stage("cells"):
            have.add("regression")
        return [m for m in MODES if m in have]

    @property
    def default_mode(self) -> str:
        return "fused" if "fused" in self.modes else "knn"

    # ------------------------------------------------------------ embedding
    def embed(self, images: Sequence[str], crops: int = 1, batch_size: int = 32) -> tuple[np.ndarray, dict[int, str]]:
        """Embeddings [n, crops, dim] (rows of failed images are zero) and {position: reason} for failures."""
        bb = self.backbone
        ds = ImageDataset(list(images), bb.preprocess, crops=crops)
        out = np.zeros((len(images), crops, bb.dim), np.float32)
        errors: dict[int, str] = {}
        progress = bar(len(images), "locate", unit="img", show=len(images) > batch_size)  # more than one batch
        for start in range(0, len(images), batch_size):
            items = [ds[i] for i in range(start, min(start + batch_size, len(images)))]
            ok = [(i, t) for i, t, err in items if err is None]
            errors.update({i: err for i, _, err in items if err is not None})
            if ok:
                out[[i for i, _ in ok]] = np.stack(self.embed_tensors([t for _, t in ok]))
            progress.update(len(items))
        progress.close()
        return out, errors

    def embed_tensors(self, tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
        """One forward pass over decoded images, each [crops, 3, s, s] (crop counts may differ) -> one
        [crops, dim] array per image. The server gathers concurrent requests into one such call."""
        bb = self.backbone
        crops = [t.reshape(-1, *t.shape[-3:]) for t in tensors]
        flat = bb.embed(torch.cat(crops).to(bb.device))
        ends = [0, *accumulate(len(c) for c in crops)]
        return [flat[a:b] for a, b in zip(ends[:-1], ends[1:])]  # np.split's views; it cost a query 0.1 ms

    # ------------------------------------------------------------ answering
    def evidence(self, emb: np.ndarray, k: int = 50) -> Evidence:
        """Every built signal for a batch of embeddings, as fusion consumes it."""
        return self._collect(self.sources, Batch(emb, k), self.fusion.params if self.fusion is not None else None)

    def _collect(self, sources: list[SignalSource], batch: Batch, params: FusionParams | None) -> Evidence:
        """The sources' evidence, restricted to this view's constraint (``params``: the setting that mixes it)."""
        ev = collect(sources, batch)
        return ev if self.constraint is None else restrict_evidence(ev, self.constraint, params)

    def locate_embeddings(self, emb: np.ndarray, mode: str | None = None, k: int = 50,
                          min_confidence: float | None = None, names: Sequence[str | None] | None = None,
                          ids: Sequence[str] | None = None, within: Constraint | None = None,
                          coverage: float = DEFAULT_COVERAGE, trips: Trips | None = None) -> list[Answer]:
        """Answers for embeddings [n, dim] (or [n, crops, dim]); each mode computes only the signals it needs,
        plus the neighbours, top cells and region (at the stated ``coverage``) that every answer lists.
        ``within``: a query-time constraint (:meth:`through`). With ``trips`` (fused mode only), the photos of
        each trip are located together (:mod:`geo.query.trip`)."""
        mode = mode or self.default_mode
        self._check(mode, k, coverage)
        _check_trip_mode(mode, trips is not None)
        if within is not None:
            return self.through(within).locate_embeddings(emb, mode, k, min_confidence, names, ids,
                                                          coverage=coverage, trips=trips)
        self._check_constrainable(mode)
        with one_row_threads(len(emb)):  # one photo's products and searches are memory-bound: see there
            return self._answers(Batch(emb, k), mode, min_confidence, names, ids, coverage, trips)

    def _answers(self, batch: Batch, mode: str, min_confidence: float | None, names: Sequence[str | None] | None,
                 ids: Sequence[str] | None, coverage: float, trips: Trips | None) -> list[Answer]:
        """:meth:`locate_embeddings` of checked settings, outside any constraint but this view's own."""
        sims, rows = knn_search(self.knn, batch)
        decisions = self._decide(mode, batch, sims, rows, trips)
        probs = cell_probs(self.cells, batch) if self.cells is not None else None
        gallery = gallery_search(self.gallery, batch) if self.gallery is not None and mode in ("gallery", "fused") else None
        lat_lon = (np.array([d.lat for d in decisions]), np.array([d.lon for d in decisions]))
        places = nearest_places(*lat_lon)
        countries = self._countries(country_index(*lat_lon), probs)
        cities = self._cities(batch.emb, len(decisions))
        regions = self.cells.regions(probs, coverage) if probs is not None else [{} for _ in decisions]
        out = []
        for i, d in enumerate(decisions):
            found = rows[i] >= 0
            r, s = rows[i][found], sims[i][found]
            out.append(Answer(
                image=names[i] if names is not None else None, id=ids[i] if ids is not None else None,
                lat=d.lat, lon=d.lon, mode=mode,
                confidence=round(d.confidence, 4), confidence_radius_km=d.radius_km, p_within=d.p_within,
                alternatives=d.alternatives,
                neighbors=self._neighbours(s, r, d.lat, d.lon),
                top_cells=self.cells.top_cells(probs[i], TOP_CELLS_SHOWN) if probs is not None else [],
                gallery=[] if gallery is None else [
                    {"lat": float(la), "lon": float(lo), "score": round(float(sc), 4)}
                    for sc, (la, lo) in zip(gallery[1][i, :GALLERY_SHOWN], gallery[0][i, :GALLERY_SHOWN])],
                evidence={"basis": d.basis, "signals": d.shares,
                          "top_similarity": round(float(s[0]), 6) if len(s) else None,
                          **({"trip": d.trip} if d.trip else {})},
                place=places[i], country=countries[i], city=city_label(places[i]),
                cities=cities[i], within=None if self.constraint is None else self.constraint.label(),
                region=regions[i], trip=d.trip.get("id"),
            ).abstain_below(min_confidence))
        return out if self.constraint is None or not self.constraint.hard else self._listed_inside(out)

    def _check(self, mode: str, k: int, coverage: float) -> None:
        """A mode, k and coverage the bundle can answer with, checked before any photo is embedded."""
        if mode not in self.modes:
            raise ValueError(f"mode {mode!r} is not available in {self.bundle.root}; built: {', '.join(self.modes)}")
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        if not 0.0 < coverage <= 1.0:  # NaN fails both comparisons
            raise ValueError(f"coverage must be a number above 0 and at most 1, not {coverage}")

    def locate_table(self, table: EmbeddingTable, mode: str | None = None, k: int = 50,
                     min_confidence: float | None = None, batch_rows: int = 4096,
                     within: Constraint | None = None, coverage: float = DEFAULT_COVERAGE,
                     trip: Travel | None = None) -> tuple[list[Answer], np.ndarray]:
        """Answers for every row of precomputed query embeddings, in input order (a bad row gets its error),
        and the rows' coordinates [n, 2] where the table has them (NaN elsewhere): the truth for scoring.
        With ``trip``, the table's trips (:func:`geo.query.trip.trips_from_table`) are located together, the
        table read as one piece so that no trip is cut."""
        answers: list[Answer] = []
        truth = []
        for piece in table.pieces(max(table.rows, 1) if trip is not None else batch_rows):
            part: list[Answer | None] = [None] * piece.rows
            coords = np.full((piece.rows, 2), np.nan)
            if len(piece.meta):
                got = self.locate_embeddings(piece.emb, mode, k, min_confidence, ids=piece.meta["id"].tolist(),
                                             within=within, coverage=coverage,
                                             trips=None if trip is None else trips_from_table(piece.meta, trip))
                for pos, a in zip(piece.ok_rows, got):
                    part[pos] = a
                coords[piece.ok_rows] = piece.meta[["lat", "lon"]].to_numpy(np.float64)
            for e in piece.errors:
                part[e["row"] - piece.first] = Answer.failed(None, e["reason"], id=e["id"])
            answers.extend(part)
            truth.append(coords)
        return answers, np.concatenate(truth) if truth else np.zeros((0, 2))

    # ------------------------------------------------------------ query-time constraints
    def through(self, constraint: Constraint) -> "GeoIndex":
        """This index seen through a query-time constraint: hard, its searches restricted to the inside
        (:func:`geo.stages.within.stages_within`); hard or soft, the evidence restricted or reweighted before
        any mode decides (:meth:`_collect`). Views are kept per constraint, so a repeated one costs nothing."""
        key = constraint.label()
        with self._views_lock:  # geo serve builds views off the model threads (check_within) while it answers
            view = self._views.get(key)
        if view is None:
            view = self._view(constraint)
            with self._views_lock:
                while len(self._views) >= VIEWS_KEPT:
                    self._views.pop(next(iter(self._views)))
                self._views[key] = view
        return view

    def _view(self, constraint: Constraint) -> "GeoIndex":
        self.load_stages()  # the view shares the loaded stages (and, once loaded, nothing else is read again)
        view = copy.copy(self)
        view.__dict__ = {k: v for k, v in self.__dict__.items() if k != "sources"}
        view.constraint, view._views, view._views_lock = constraint, {}, threading.Lock()
        if constraint.hard:
            inside = stages_within(constraint, self.knn, self.cells, self.gallery)
            view.knn = inside.knn
            view.__dict__.update(cells=inside.cells, gallery=inside.gallery, sources=inside.sources)
        return view

    def check_within(self, mode: str, within: Constraint) -> None:
        """A ValueError, before anything is searched, for a constraint with no gallery photo inside or one the
        mode cannot honour (its view of the index is built now: ``geo serve`` calls this off the model threads)."""
        self.through(within)._check_constrainable(mode)

    def _check_constrainable(self, mode: str) -> None:
        if self.constraint is None:
            return
        if mode == "regression":
            raise ValueError(f"mode regression answers one point from a regression and cannot be kept inside "
                             f"{self.constraint.label()}; use another mode ({', '.join(self.modes)})")
        tuned = self.fusion is not None and self.fusion.params.mode_fusion.get(mode)
        if not self.constraint.hard and mode != "fused" and not tuned:
            raise ValueError(f"--within-weight reweights fusion's evidence, and mode {mode} answers by its own vote "
                             "here: use the fused mode, or a hard constraint (no --within-weight)")

    def _listed_inside(self, answers: list[Answer]) -> list[Answer]:
        """Under a hard constraint, the top cells and gallery points answers list are the inside ones too (the
        answers, alternatives and neighbours already are); one test for all of them."""
        listed = [(a, f, c) for a in answers for f in ("top_cells", "gallery") for c in getattr(a, f)]
        inside = self.constraint.contains([c["lat"] for _, _, c in listed], [c["lon"] for _, _, c in listed])
        for a in answers:
            a.top_cells, a.gallery = [], []
        for (a, f, c), ok in zip(listed, inside):
            if ok:
                getattr(a, f).append(c)
        return answers

    def _cities(self, emb: np.ndarray, n: int) -> list[list[dict[str, Any]]]:
        """The city head's most probable cities per query; under a hard constraint, among those inside it
        (the head's mass renormalised over them and its "elsewhere" class)."""
        head = self.cells.city_head if self.cells is not None else None
        if head is None:
            return [[] for _ in range(n)]
        if self.constraint is None or not self.constraint.hard or not head.used:
            return head.answer_cities(emb)
        probs = np.where(self._cities_kept, head.probs(emb), 0.0)
        probs /= probs.sum(axis=1, keepdims=True).clip(min=1e-300)
        return [[c for c in head.top(p) if c["prob"] > 0] for p in probs]

    @cached_property
    def _cities_kept(self) -> np.ndarray:
        """[classes] True for the city head's classes inside this view's constraint ("elsewhere", last, stays)."""
        points = city_points(self.cells.city_head.cities["city"].tolist())
        keep = self.constraint.contains(points[:, 0], points[:, 1])
        keep[-1] = True
        return keep

    @cached_property
    def _cell_countries(self) -> np.ndarray | None:
        """The country of each fine cell's centre (the photos' mean), for the country's probability."""
        if self.cells is None:
            return None
        fine = self.cells.columns[-1]
        return country_index(fine["lat"].astype(np.float64), fine["lon"].astype(np.float64))

    def _countries(self, idx: np.ndarray, probs: np.ndarray | None) -> list[dict[str, Any]]:
        """Each answer's country, with the cell heads' probability mass on it when the bundle has cells."""
        names, codes, out = country_names(), country_codes(), []
        for i, c in enumerate(idx.tolist()):
            if c < 0:
                out.append({})
                continue
            p = None if probs is None else round(float(probs[i][self._cell_countries == c].sum()), 4)
            out.append({"code": codes[c], "name": names[c], "probability": p})
        return out

    def _decide(self, mode: str, batch: Batch, sims: np.ndarray, rows: np.ndarray,
                trips: Trips | None = None) -> list[_Decision]:
        if mode != "fused":
            return self._calibrated(mode, batch, self._single(mode, batch, sims, rows))
        params = self.fusion.params
        ev = self._collect(self.sources, batch, params)
        out = []
        for d in self.fusion.decide(ev):  # the reranker's answer where it has one
            p = d.p_within or _p_within(d.mass, params.calibration, d.duplicate)
            basis = "near-duplicate" if d.duplicate else (
                "prior" if d.constant or d.shares.get(BACKOFF_SIGNAL, 0.0) >= PRIOR_ONLY else "image")
            out.append(_Decision(d.lat, d.lon, p["25"], 25.0, p, d.alternatives, d.shares, basis))
        return out if trips is None else _with_trips(out, ev, params, batch.pooled, trips)

    def _single(self, mode: str, batch: Batch, sims: np.ndarray, rows: np.ndarray) -> list[_Decision]:
        """A single mode's answers with its own, uncalibrated confidence. The cells and gallery modes mix in
        the prior as fusion tuned them (``mode_fusion``): where their signal did not beat the constant guess
        on other photographers, they answer like the prior and say so."""
        own = {mode: 1.0}
        if mode == "regression":  # the held-out hit rates are its stated confidence (one value for every photo)
            p = {t: float(v) for t, v in self.cells.regression.info.get("p_within", {}).items()}
            return [_Decision(float(a), float(b), p.get("25", 0.0), 25.0, p_within=dict(p), shares=own)
                    for a, b in zip(*self.cells.regression.predict(batch.emb))]
        tuned = self.fusion.params.mode_fusion.get(mode) if self.fusion is not None else None
        if tuned:
            params = FusionParams.from_dict(tuned)
            ev = self._collect([s for s in self.sources if s.spec.name in params.signals], batch, params)
            return [_Decision(d.lat, d.lon, 0.0, 25.0, alternatives=d.alternatives, shares=d.shares,
                              basis="prior" if d.shares.get(BACKOFF_SIGNAL, 0.0) >= PRIOR_ONLY else "image")
                    for d in decide(ev, params)]
        if mode == "knn":
            out = []
            for s, r in zip(sims, rows):
                v = kde_vote(self.knn.lat[r[r >= 0]], self.knn.lon[r[r >= 0]], s[r >= 0], self.knn_params)
                out.append(_Decision(v.lat, v.lon, v.confidence, self.knn_params.radius_km, shares=own))
            return out
        if mode == "gallery":
            latlon, scores = gallery_search(self.gallery, batch)
            return [_Decision(float(g[0, 0]), float(g[0, 1]), float(neighbour_weights(sc[np.isfinite(sc)], 1.0)[0]), 0.0,
                              shares=own) for g, sc in zip(latlon, scores)]
        # cells: the photo spot with most f* mass within 750, then 200, then 25 km (see RESULTS.md)
        lat, lon, mass = self.cells.decide(cell_probs(self.cells, batch))
        return [_Decision(float(a), float(b), float(m), DECISION_RADII_KM[0], shares=own)
                for a, b, m in zip(lat, lon, mass)]

    def _calibrated(self, mode: str, batch: Batch, decisions: list[_Decision]) -> list[_Decision]:
        """Where fusion calibrated this mode (``mode_calibration``), its confidence becomes what the fused
        mode's means: the calibrated probability of being within 25 km, with ``p_within`` at 25/200/750 km.
        A near-duplicate keeps its raw mass, as in the fused mode (calibration never saw one)."""
        params = self.fusion.params if self.fusion is not None else None
        maps = params.mode_calibration.get(mode) if params is not None else None
        if not maps:
            return decisions  # a kNN-only bundle (or one fitted before): the mode's own measure, as before
        # the mode's signal, and kNN's for fusion's own near-duplicate rule (its search is memoised in the batch)
        ev = self._collect([s for s in self.sources if s.spec.name in (mode, DUPLICATE_SIGNAL)], batch, params)
        mass = mass_near(ev, params, mode, np.array([[d.lat, d.lon] for d in decisions], np.float64))
        for d, m, dup in zip(decisions, mass, near_duplicate(ev, params)):
            d.p_within = _p_within({str(t): float(v) for t, v in zip(THRESHOLDS_KM, m)}, maps, bool(dup))
            d.confidence, d.radius_km = d.p_within["25"], 25.0
        return decisions

    def _neighbours(self, sims: np.ndarray, rows: np.ndarray, lat: float, lon: float) -> list[dict[str, Any]]:
        dist = haversine_km(self.knn.lat[rows], self.knn.lon[rows], lat, lon)
        return [{"id": i, "path": p, "lat": la, "lon": lo, "similarity": round(s, 6), "distance_km": round(d, 3)}
                for i, p, la, lo, s, d in zip(self.knn.ids[rows].tolist(), self.knn.paths[rows].tolist(),
                                              self.knn.lat[rows].tolist(), self.knn.lon[rows].tolist(),
                                              np.asarray(sims, float).tolist(), np.asarray(dist, float).tolist())]

    def locate(self, images: str | Path | Sequence[str | Path], mode: str | None = None, k: int = 50, crops: int = 1,
               min_confidence: float | None = None, within: Constraint | None = None,
               coverage: float = DEFAULT_COVERAGE, trip: Travel | None = None) -> list[Answer]:
        """One Answer per photo the arguments (paths, globs or folders; one or a list) expand to, in order, so a
        caller never checks which it got; a photo that cannot be read gets an Answer with its error. ``within``
        keeps the answers inside a :class:`~geo.data.constraint.Constraint` (hard) or leans them in (soft). With
        ``trip``, each folder's photos are one trip, located together in the order of their EXIF times."""
        args = [images] if isinstance(images, (str, Path)) else images
        return self.locate_modes(args, [mode], k, crops, min_confidence, within, coverage, trip)[0]

    def locate_one(self, image: str | Path, mode: str | None = None, k: int = 50, crops: int = 1,
                   min_confidence: float | None = None, within: Constraint | None = None,
                   coverage: float = DEFAULT_COVERAGE) -> Answer:
        """The Answer for exactly one photo: a ValueError, before anything is embedded, when ``image`` is a
        folder or glob that holds no photo or several (``locate`` answers those). A path that does not
        exist or cannot be decoded is one photo: its Answer carries the error, as in ``locate``."""
        if not isinstance(image, (str, Path)):
            raise TypeError(f"locate_one takes one path, not {type(image).__name__}; use locate for several")
        self._check_modes([mode], k, coverage, within, None)
        paths = expand_images(str(image))
        if len(paths) > 1:
            raise ValueError(f"{image}: {len(paths)} photos; locate_one answers exactly one (use locate)")
        if _matches_nothing(paths[0]):
            raise ValueError(f"{image}: no photo there; locate_one answers exactly one")
        return self._answer_paths(paths, [mode], k, crops, min_confidence, within, coverage, None)[0][0]

    def locate_modes(self, images: Sequence[str], modes: Sequence[str | None], k: int = 50, crops: int = 1,
                     min_confidence: float | None = None, within: Constraint | None = None,
                     coverage: float = DEFAULT_COVERAGE, trip: Travel | None = None) -> list[list[Answer]]:
        """One list of answers per mode for the same images, each image decoded and embedded once
        (``geo bench --mode all`` compares every mode at the cost of one embedding pass)."""
        self._check_modes(modes, k, coverage, within, trip)
        return self._answer_paths(expand_images([str(i) for i in images]), modes, k, crops, min_confidence, within,
                                  coverage, trip)

    def _check_modes(self, modes: Sequence[str | None], k: int, coverage: float, within: Constraint | None,
                     trip: Travel | None) -> None:
        """An unknown mode, k or coverage fails before the photos are embedded; so does a constraint the mode
        cannot honour, or one with no photo inside."""
        for m in modes:
            self._check(m or self.default_mode, k, coverage)
            _check_trip_mode(m or self.default_mode, trip is not None)
            if within is not None:
                self.check_within(m or self.default_mode, within)

    def _answer_paths(self, paths: list[str], modes: Sequence[str | None], k: int, crops: int,
                      min_confidence: float | None, within: Constraint | None, coverage: float,
                      trip: Travel | None) -> list[list[Answer]]:
        """:meth:`locate_modes` of checked settings and expanded image files (``locate_one`` expands its path
        to check it: its file is not looked up twice)."""
        emb, errors = self.embed(paths, crops=crops)
        good = [i for i in range(len(paths)) if i not in errors]
        trips = None if trip is None else trips_from_photos([paths[i] for i in good], trip)
        out = []
        for mode in modes:
            answers = [Answer.failed(p, errors[i]) if i in errors else None for i, p in enumerate(paths)]
            if good:
                for i, a in zip(good, self.locate_embeddings(emb[good], mode=mode, k=k, min_confidence=min_confidence,
                                                             names=[paths[i] for i in good], within=within,
                                                             coverage=coverage, trips=trips)):
                    answers[i] = a
            out.append(answers)
        return out


def _check_trip_mode(mode: str, trips: bool) -> None:
    """Trips are located on the fused posterior: another mode with trips is refused."""
    if trips and mode != "fused":
        raise ValueError(f"trips are located on the fused posterior; mode {mode!r} cannot locate them")


def _with_trips(decisions: list[_Decision], ev: Evidence, params: FusionParams, emb: np.ndarray,
                trips: Trips) -> list[_Decision]:
    """The fused decisions with each trip's photos located together; a photo answered alone keeps its own
    answer, and every photo says how its trip placed it (``trip``)."""
    own = np.array([[d.lat, d.lon] for d in decisions], np.float64)
    doubt = np.array([1.0 - d.p_within.get("750", 0.0) for d in decisions])
    for d, t in zip(decisions, locate_trips(ev, params, own, doubt, emb, trips)):
        d.trip = t.note
        if t.lat is not None:
            d.lat, d.lon, d.p_within, d.alternatives = t.lat, t.lon, t.p_within, t.alternatives
            d.confidence, d.radius_km = t.p_within["25"], 25.0
    return decisions
