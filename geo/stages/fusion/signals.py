"""Signals: each fitted stage's evidence about a photo, as weighted points on the globe.

A signal is a name, a way to turn its scores into probability mass
(:class:`SignalSpec`) and, per batch of queries, its support points with their
raw scores, best first (:class:`SignalEvidence`). Fusion knows nothing else
about a signal: a new head (country, city, regression, a fine-tuned model's
cells) is one more :class:`SignalSource` here, and the posterior, the tuning
grid and the calibration pick it up from its spec.

The sources read the stage artifacts (kNN index, cell predictor, GPS gallery,
the gallery's photo prior) through the small interfaces they share, and the
same code serves the query side (:mod:`geo.query.index`) and the out-of-fold
tuning (:mod:`geo.stages.fusion.stage`), where the artifacts are fitted in
memory on other photographers' photos.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate
from typing import Any, Callable, Protocol

import numpy as np

from geo.core.priors import prior_summary


@dataclass(frozen=True)
class SignalSpec:
    """How fusion treats one signal.

    ``kind`` "logits": mass = softmax(score / temperature) over the best
    ``top_k``; "probs": mass = the scores renormalised over the best ``top_k``
    (0 = all). ``temperatures`` and ``top_ks`` are the tuning grid; the
    defaults are used by a bundle whose fusion could not be tuned.
    ``prudence`` orders signals in the one-standard-error choice: among
    settings the data cannot tell apart, the one leaning most on the most
    prudent signal wins (the population prior, then the calibrated cells).
    """

    name: str
    kind: str
    temperatures: tuple[float, ...] = (1.0,)
    top_ks: tuple[int, ...] = (0,)
    default_weight: float = 0.0
    default_temperature: float = 1.0
    default_top_k: int = 0
    prudence: int = 0


@dataclass
class SignalEvidence:
    """One signal for a batch of n queries: k support points each, best first.

    Padding has latitude NaN and score -inf ("logits") or 0 ("probs"), so it
    carries no mass and is never a candidate answer.
    """

    latlon: np.ndarray  # float64 [n, k, 2]
    score: np.ndarray   # float64 [n, k]

    @property
    def width(self) -> int:
        return self.score.shape[1]

    def padded(self, width: int, kind: str) -> "SignalEvidence":
        extra = width - self.width
        if extra <= 0:
            return self
        pad = -np.inf if kind == "logits" else 0.0
        return SignalEvidence(np.pad(self.latlon, ((0, 0), (0, extra), (0, 0)), constant_values=np.nan),
                              np.pad(self.score, ((0, 0), (0, extra)), constant_values=pad))


@dataclass
class Evidence:
    """Every signal's evidence for one batch, in a fixed order (the order of ``specs``)."""

    specs: list[SignalSpec]
    signals: dict[str, SignalEvidence]

    def __len__(self) -> int:
        return len(next(iter(self.signals.values())).score) if self.signals else 0

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @cached_property
    def points(self) -> np.ndarray:
        """Support points [n, m, 2]: every signal's locations side by side; they are also the candidates
        (made once: the closeness, the answer and its alternatives all read them)."""
        return np.concatenate([self.signals[n].latlon for n in self.names], axis=1)

    @cached_property
    def top_similarity(self) -> np.ndarray:
        """[n] the best neighbour's similarity (-inf without one, or without the kNN signal): every
        near-duplicate test of a decision reads it."""
        if DUPLICATE_SIGNAL not in self.signals:
            return np.full(len(self), -np.inf)
        s = self.signals[DUPLICATE_SIGNAL].score
        return np.max(s, axis=1, where=np.isfinite(s), initial=-np.inf)

    def blocks(self) -> list[slice]:
        """Where each signal's points sit in :attr:`points`."""
        edges = [0, *accumulate(self.signals[n].width for n in self.names)]
        return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]

    def take(self, rows: np.ndarray) -> "Evidence":
        return Evidence(self.specs, {n: SignalEvidence(e.latlon[rows], e.score[rows]) for n, e in self.signals.items()})

    @staticmethod
    def concat(parts: list["Evidence"]) -> "Evidence":
        """Stack batches whose widths differ (padding carries no mass)."""
        specs = parts[0].specs
        out = {}
        for spec in specs:
            width = max(p.signals[spec.name].width for p in parts)
            padded = [p.signals[spec.name].padded(width, spec.kind) for p in parts]
            out[spec.name] = SignalEvidence(np.concatenate([e.latlon for e in padded]),
                                            np.concatenate([e.score for e in padded]))
        return Evidence(specs, out)


# ---------------------------------------------------------------- one batch of queries
class Batch:
    """Query embeddings ([n, dim] or [n, crops, dim]) and what has been computed for them.

    Several sources and the answer itself need the same kNN search or cell
    posterior; each is computed once per batch.
    """

    def __init__(self, emb: np.ndarray, k: int = 50):
        self.emb = np.asarray(emb, np.float32)
        self.k = int(k)
        self._memo: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.emb)

    @property
    def pooled(self) -> np.ndarray:
        """One embedding per query: crops averaged (their mean's inner product is the mean similarity)."""
        return self.memo("pooled", lambda: np.ascontiguousarray(
            self.emb.mean(axis=1) if self.emb.ndim == 3 else self.emb, np.float32))

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]


class SignalSource(Protocol):
    spec: SignalSpec

    def evidence(self, batch: Batch) -> SignalEvidence: ...


# ---------------------------------------------------------------- the sources
KNN = SignalSpec("knn", "logits", temperatures=(0.02, 0.05, 0.1), default_weight=0.2, default_temperature=0.05)
GALLERY = SignalSpec("gallery", "logits", temperatures=(0.5, 1.0, 2.0), top_ks=(32,), default_weight=0.2,
                     default_temperature=1.0, default_top_k=32)
CELLS = SignalSpec("cells", "probs", top_ks=(8, 32), default_weight=0.4, default_top_k=32, prudence=1)
PRIOR = SignalSpec("prior", "probs", default_weight=0.2, prudence=2)
# A neighbour this similar is a near-duplicate of a gallery photo: the kNN signal alone answers.
DUPLICATE_SIGNAL = KNN.name
# The signal that alone gives the best constant guess; fusion backs off to it without clear evidence.
BACKOFF_SIGNAL = PRIOR.name
GALLERY_WIDTH = 32  # gallery points retrieved per query (the top_k grid never asks for more)
CELLS_WIDTH = 32  # most probable fine cells kept per query


class KnnSignal:
    """The photo's nearest gallery photos, at their coordinates; scores are cosine similarities."""

    spec = KNN

    def __init__(self, index: Any):
        self.index = index  # geo.stages.knn.KnnIndex

    def evidence(self, batch: Batch) -> SignalEvidence:
        sims, rows = knn_search(self.index, batch)
        ok = rows >= 0
        latlon = np.stack([np.where(ok, self.index.lat[rows], np.nan), np.where(ok, self.index.lon[rows], np.nan)], -1)
        return SignalEvidence(latlon, np.where(ok, sims, -np.inf).astype(np.float64))


def knn_search(index: Any, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, gallery rows) [n, k] of the batch, computed once."""
    return batch.memo(f"knn:{id(index)}", lambda: index.search(batch.pooled, batch.k))


class GallerySignal:
    """The GPS gallery's best points for the photo; scores are the location encoder's logits plus the log prior."""

    spec = GALLERY

    def __init__(self, gallery: Any):
        self.gallery = gallery  # geo.stages.gallery.stage.GpsGallery

    def evidence(self, batch: Batch) -> SignalEvidence:
        latlon, scores = gallery_search(self.gallery, batch)
        return SignalEvidence(np.asarray(latlon, np.float64), np.asarray(scores, np.float64))


def gallery_search(gallery: Any, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    return batch.memo(f"gallery:{id(gallery)}", lambda: gallery.search(batch.pooled, GALLERY_WIDTH))


class CellsSignal:
    """The most probable fine cells (hierarchical, calibrated heads), at their photos' mean."""

    spec = CELLS

    def __init__(self, cells: Any):
        self.cells = cells  # geo.stages.cells.predictor.CellPredictor

    def evidence(self, batch: Batch) -> SignalEvidence:
        probs = cell_probs(self.cells, batch)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :CELLS_WIDTH]
        p = probs[np.arange(len(probs))[:, None], order].astype(np.float64)
        t = self.cells.columns[-1]
        lat, lon = t["lat"].astype(np.float64)[order], t["lon"].astype(np.float64)[order]
        zero = p <= 0  # an underflowed cell is no candidate
        return SignalEvidence(np.stack([np.where(zero, np.nan, lat), np.where(zero, np.nan, lon)], -1), p)


def cell_probs(cells: Any, batch: Batch) -> np.ndarray:
    """Fine-cell probabilities [n, C], averaged over crops (Müller-Budack's multi-crop), computed once."""
    def compute() -> np.ndarray:
        e = batch.emb if batch.emb.ndim == 3 else batch.emb[:, None]
        return cells.fine_probs(e.reshape(-1, e.shape[-1])).reshape(e.shape[0], e.shape[1], -1).mean(axis=1)
    return batch.memo(f"cells:{id(cells)}", compute)


class PriorSignal:
    """Where the gallery's photos are (the same points for every query), plus the constant guesses as candidates."""

    spec = PRIOR

    def __init__(self, lat: np.ndarray, lon: np.ndarray):
        self.points, self.weights = prior_summary(lat, lon)

    def evidence(self, batch: Batch) -> SignalEvidence:
        n = len(batch)
        return SignalEvidence(np.broadcast_to(self.points, (n, *self.points.shape)).astype(np.float64),
                              np.broadcast_to(self.weights, (n, len(self.weights))).astype(np.float64))


def specs_for(has_cells: bool, has_gallery: bool) -> list[SignalSpec]:
    """The signals of a bundle with these stages, in fusion's order (the order :func:`sources_for` gives)."""
    return [KNN, *([GALLERY] if has_gallery else []), *([CELLS] if has_cells else []), PRIOR]


def sources_for(knn: Any, cells: Any | None, gallery: Any | None, lat: np.ndarray, lon: np.ndarray) -> list[SignalSource]:
    """The signals a set of fitted stages gives, in fusion's order."""
    out: list[SignalSource] = [KnnSignal(knn)]
    if gallery is not None:
        out.append(GallerySignal(gallery))
    if cells is not None:
        out.append(CellsSignal(cells))
    out.append(PriorSignal(lat, lon))
    return out


def collect(sources: list[SignalSource], batch: Batch) -> Evidence:
    """Every source's evidence for the batch."""
    return Evidence([s.spec for s in sources], {s.spec.name: s.evidence(batch) for s in sources})
