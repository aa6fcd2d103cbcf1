"""Fusion's posterior and decision: one mixture over any number of named signals.

Each signal (:mod:`geo.stages.fusion.signals`) becomes probability mass on its
support points; the posterior is ``sum_s w_s * mass_s``. The answer is the
candidate point with the most posterior mass within the field's thresholds
(1/25/200/750/2500 km, averaged, or only the coarse ones): at the coarse
thresholds the cells and the prior decide the region (PIGEON's "refine within
the top cells"), at the fine ones kNN and gallery support pick the spot inside
it. With weak image evidence the prior's weight makes the answer the best
constant guess; a near-duplicate neighbour (similarity above anything seen
between different photographers) takes all the weight, so it wins outright.

Weights, temperatures and top-K are fitted at build time on out-of-fold
evidence (:mod:`geo.stages.fusion.tuning`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from geo.core.geodesy import THRESHOLDS_KM, cos_km, latlon_to_xyz
from geo.stages.fusion.signals import (
    BACKOFF_SIGNAL,
    DUPLICATE_SIGNAL,
    Evidence,
    SignalSpec,
)

# Which thresholds' mass the decision maximises: all five (the field's mean accuracy), only the
# coarse ones, where weak evidence still carries information, or the region (750 km) alone, which
# with the prior alone is exactly the best constant guess.
DECISIONS = {"all": (1.0, 1.0, 1.0, 1.0, 1.0), "coarse": (0.0, 0.0, 0.0, 1.0, 1.0), "region": (0.0, 0.0, 0.0, 1.0, 0.0)}


@dataclass
class SignalParams:
    weight: float
    temperature: float = 1.0
    top_k: int = 0  # 0: every support point of the signal counts


@dataclass
class FusionParams:
    """Per-signal weights, temperatures and top-K, the decision rule and the calibration of ``p_within``."""

    signals: dict[str, SignalParams]
    # A neighbour at least this similar is a near-duplicate: the answer snaps to the kNN evidence.
    # Set at build above any similarity seen between different photographers' photos.
    duplicate_similarity: float = 0.95
    decision: str = "all"
    calibration: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # The single modes' p_within: each mode's own signal mass near its answer -> observed frequency, fitted
    # on the same out-of-fold photos, so every mode's confidence means the same thing.
    mode_calibration: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    # The single modes that back off: "cells" or "gallery" -> the params (as a dict) of that signal mixed with
    # the prior, tuned out of fold like the fused mode, so a mode whose signal does not beat the prior on new
    # photographers answers like the prior instead of below it.
    mode_fusion: dict[str, dict[str, Any]] = field(default_factory=dict)
    # What the reranker (fusion/rerank.json) learned, for the build's words; empty where the mixture answers.
    rerank: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def default(cls, specs: list[SignalSpec]) -> "FusionParams":
        """The untuned setting: each signal's default weight, temperature and top-K."""
        return cls({s.name: SignalParams(s.default_weight, s.default_temperature, s.default_top_k) for s in specs})

    def weight(self, name: str) -> float:
        p = self.signals.get(name)
        return p.weight if p is not None else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FusionParams":
        """Read stored params; bundles from before named signals (``w_knn``, ...) are read as the same setting."""
        if "signals" not in d:
            d = {"signals": {
                "knn": {"weight": d["w_knn"], "temperature": d["knn_temperature"]},
                "gallery": {"weight": d["w_gallery"], "temperature": d["gallery_temperature"], "top_k": d["gallery_k"]},
                "cells": {"weight": d["w_cells"], "top_k": d["top_cells"]},
                "prior": {"weight": d["w_prior"]}},
                **{k: d[k] for k in ("duplicate_similarity", "decision", "calibration") if k in d}}
        return cls({n: SignalParams(**p) for n, p in d["signals"].items()},
                   **{k: d[k] for k in ("duplicate_similarity", "decision", "calibration", "mode_calibration",
                                        "mode_fusion", "rerank") if k in d})


@dataclass
class Decision:
    lat: float
    lon: float
    mass: dict[str, float]          # posterior mass within each threshold of the answer
    score: float                    # the decision's objective at the answer
    alternatives: list[dict[str, float]]
    shares: dict[str, float] = field(default_factory=dict)  # each signal's part of the mass within SHARE_KM
    duplicate: bool = False         # a near-duplicate neighbour took all the weight
    p_within: dict[str, float] = field(default_factory=dict)  # the reranker's calibrated p_within, when it answered
    constant: bool = False          # the reranker found no usable evidence: the best constant guess answered


SHARE_KM = 750  # the region: where even a weak image signal and the prior both put mass


def _softmax_rows(z: np.ndarray, t: float) -> np.ndarray:
    if z.shape[1] == 0:
        return np.zeros_like(z, dtype=np.float64)
    z = z.astype(np.float64) / t
    finite = np.isfinite(z)
    m = np.max(z, axis=1, keepdims=True, where=finite, initial=-np.inf)
    e = np.where(finite, np.exp(z - np.where(np.isfinite(m), m, 0.0)), 0.0)
    s = e.sum(axis=1, keepdims=True)
    return np.divide(e, s, out=np.zeros_like(e), where=s > 0)


def _normalise(x: np.ndarray) -> np.ndarray:
    s = x.sum(axis=1, keepdims=True)
    return np.divide(x, s, out=np.zeros_like(x), where=s > 0)


def _ranked(width: int, top_k: int) -> np.ndarray:
    """[width] True for the first ``top_k`` positions (all when top_k is 0)."""
    return np.arange(width) < (top_k if top_k > 0 else width)


def signal_mass(spec: SignalSpec, score: np.ndarray, p: SignalParams) -> np.ndarray:
    """One signal's distribution over its support points (rows sum to 1, or 0 when absent)."""
    keep = _ranked(score.shape[1], p.top_k)
    if spec.kind == "logits":
        return _softmax_rows(np.where(keep, score, -np.inf), p.temperature)
    return _normalise(np.where(keep, score, 0.0).astype(np.float64))


def present(spec: SignalSpec, score: np.ndarray) -> np.ndarray:
    """[n] True where the signal has any evidence for the query."""
    return (np.isfinite(score) if spec.kind == "logits" else score > 0).any(axis=1)


def near_duplicate(ev: Evidence, p: FusionParams) -> np.ndarray:
    """[n] True where the best neighbour is at least ``duplicate_similarity`` similar."""
    return ev.top_similarity >= p.duplicate_similarity


def signal_weights(ev: Evidence, p: FusionParams) -> np.ndarray:
    """[n, signals] mixture weights in ``ev``'s order.

    Absent signals' weight goes to the present ones, and a near-duplicate
    neighbour takes all of it.
    """
    have = np.stack([present(s, ev.signals[s.name].score) for s in ev.specs], axis=1)
    w = np.where(have, np.array([p.weight(n) for n in ev.names], np.float64), 0.0)
    if DUPLICATE_SIGNAL in ev.names:
        w[near_duplicate(ev, p)] = np.array([n == DUPLICATE_SIGNAL for n in ev.names], np.float64)
    fallback = w.sum(axis=1) == 0
    w[fallback] = have[fallback].astype(np.float64)
    return w / w.sum(axis=1, keepdims=True).clip(min=1e-12)


def closeness(ev: Evidence) -> np.ndarray:
    """[n, m, m] cosine of the angle between every pair of support points (which are also the candidates).

    Only comparisons with the thresholds are needed, and ``d <= t`` is
    ``cos(d / R) >= cos(t / R)``: a batched 3-vector product instead of a
    haversine per pair keeps fusion inside its latency budget.
    """
    pts = ev.points
    xyz = latlon_to_xyz(pts[..., 0], pts[..., 1])  # float64: cos(1 km / R) is 1 - 1.2e-8
    # matmul, not einsum: BLAS is 5x faster here, 0.2 ms of a warm query (the same products to 1e-15)
    c = xyz @ xyz.transpose(0, 2, 1)
    c[np.isnan(c)] = -2.0  # NaN padding is never within reach
    return c


# float32 elements of one block of :func:`coverage`'s masks [queries, thresholds, candidates, points]: 32 MB
COVERAGE_BLOCK = 1 << 23
_COS_T = np.array([cos_km(t) for t in THRESHOLDS_KM])[:, None, None]


def coverage(c: np.ndarray, block: slice, mass: np.ndarray) -> np.ndarray:
    """[n, thresholds, m]: one signal's mass within each threshold of every candidate (``c`` from :func:`closeness`).

    Every threshold's mask in one comparison and one product per block of queries: one call per threshold cost
    a warm query 0.9 ms in call overheads alone."""
    cb = c[:, :, block]
    n, m, k = cb.shape
    t = len(THRESHOLDS_KM)
    mass = mass.astype(np.float32)[:, :, None]
    step = max(1, COVERAGE_BLOCK // max(1, t * m * k))
    out = [((cb[r:r + step, None] >= _COS_T).astype(np.float32).reshape(-1, t * m, k) @ mass[r:r + step])
           .reshape(-1, t, m) for r in range(0, n, step)]
    if len(out) == 1:  # a query's answer: no copy
        return out[0]
    return np.concatenate(out) if out else np.zeros((0, t, m), np.float32)


def signal_masses(ev: Evidence, p: FusionParams) -> list[np.ndarray]:
    """Each signal's :func:`signal_mass` over its own points, in ``ev``'s order."""
    return [signal_mass(s, ev.signals[s.name].score, p.signals.get(s.name, SignalParams(0.0))) for s in ev.specs]


def signal_coverages(ev: Evidence, p: FusionParams, c: np.ndarray,
                     masses: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Each signal's :func:`coverage` (``masses``: its :func:`signal_masses`, where the caller has them)."""
    masses = signal_masses(ev, p) if masses is None else masses
    return [coverage(c, block, mass) for mass, block in zip(masses, ev.blocks())]


def mass_near(ev: Evidence, p: FusionParams, name: str, answers: np.ndarray) -> np.ndarray:
    """[n, thresholds]: signal ``name``'s own mass (its fitted temperature and top-K) within each threshold of
    the given answers [n, 2]: how strongly a single mode's evidence backs its answer."""
    block = ev.blocks()[ev.names.index(name)]
    spec = ev.specs[ev.names.index(name)]
    e = ev.signals[name]
    mass = signal_mass(spec, e.score, p.signals.get(name, SignalParams(1.0)))
    c = (latlon_to_xyz(ev.points[:, block, 0], ev.points[:, block, 1])
         @ latlon_to_xyz(answers[:, 0], answers[:, 1])[:, :, None])[..., 0]
    c = np.nan_to_num(c, nan=-2.0)
    return np.stack([(mass * (c >= cos_km(t))).sum(axis=1) for t in THRESHOLDS_KM], axis=1)


def candidates(ev: Evidence, p: FusionParams) -> np.ndarray:
    """[n, m] True for real candidates: padding and points beyond a signal's top-K are dropped."""
    out = []
    for s in ev.specs:
        e = ev.signals[s.name]
        top_k = p.signals[s.name].top_k if s.name in p.signals else 0
        out.append(np.isfinite(e.latlon[..., 0]) & _ranked(e.width, top_k))
    return np.concatenate(out, axis=1)


def decide_batch(ev: Evidence, p: FusionParams, covered: list[np.ndarray] | None = None,
                 c: np.ndarray | None = None, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(best candidate [n], candidate scores [n, m], posterior mass within each threshold [n, T, m]).

    ``covered`` (each signal's :func:`coverage`) may be passed in when many
    settings share the signals' masses, as in tuning; ``w`` (:func:`signal_weights`) when the caller needs it too.
    """
    if covered is None:
        covered = signal_coverages(ev, p, closeness(ev) if c is None else c)
    if w is None:
        w = signal_weights(ev, p)
    masses = sum(cov * w[:, b, None, None].astype(np.float32) for b, cov in enumerate(covered))
    u = np.tile(np.asarray(DECISIONS[p.decision], np.float32), (len(ev), 1))
    u[near_duplicate(ev, p)] = DECISIONS["all"]  # a near-duplicate is answered at its spot, not just its region
    score = np.where(candidates(ev, p), ((u / u.sum(axis=1, keepdims=True))[:, None, :] @ masses)[:, 0], -np.inf)
    return score.argmax(axis=1), score, masses


# (best [n], scores [n, m], p_within per query, [n] True where the constant guess answered)
Rescored = tuple[np.ndarray, np.ndarray, list[dict[str, float]], np.ndarray]
# What the mixture computed for a batch: its answer [n] and scores [n, m] (:func:`decide_batch`), and each signal's
# own mass over its points (:func:`signal_masses`)
Mixed = tuple[np.ndarray, np.ndarray, list[np.ndarray]]
# (evidence, setting, closeness, coverages, the mixture's :data:`Mixed`)
Rescore = Callable[[Evidence, FusionParams, np.ndarray, list[np.ndarray], Mixed], Rescored]


# An alternative's own posterior mass within these radii: under a regional decision every candidate of one region
# has the same score (its mass within 750 km), so the score alone named three places with one number.
ALTERNATIVE_MASS_KM = (25, 200, 750)


def _best_first(score: np.ndarray, masses: np.ndarray) -> np.ndarray:
    """Candidates best first: by score, ties by the mass within the finest radius, then the next (``masses``
    [thresholds, candidates]), then candidate order."""
    return np.lexsort((*(-masses[k] for k in reversed(range(len(masses)))), -score))


def decide(ev: Evidence, p: FusionParams, alternatives: int = 5, rerank: Rescore | None = None) -> list[Decision]:
    """The answer per query, its alternatives (other places, not the same spot again) and what carried it:
    each signal's share of the posterior mass within :data:`SHARE_KM` of the answer.

    ``rerank`` (:func:`geo.stages.fusion.rerank.rescorer`) re-scores the
    candidates from the mixture's closeness and coverages: it picks the answer
    and orders the alternatives, gives ``p_within`` and says which answers are its constant guess."""
    c = closeness(ev)
    own = signal_masses(ev, p)
    covered = signal_coverages(ev, p, c, own)
    w = signal_weights(ev, p)
    best, score, masses = decide_batch(ev, p, covered=covered, w=w)
    p_within: list[dict[str, float]] = [{} for _ in best]
    constant = np.zeros(len(best), bool)
    if rerank is not None:
        best, score, p_within, constant = rerank(ev, p, c, covered, (best, score, own))
    k_share = THRESHOLDS_KM.index(SHARE_KM)
    parts = np.stack([cov[np.arange(len(best)), k_share, best] for cov in covered], axis=1) * w  # [n, signals]
    parts /= parts.sum(axis=1, keepdims=True).clip(min=1e-12)
    dup = near_duplicate(ev, p)
    pts = ev.points
    near = cos_km(25.0)
    out = []
    for i, b in enumerate(best):
        alts = []
        apart = c[i, :, b] < near  # [m] candidates 25 km or more from every place taken so far
        finite = np.isfinite(score[i])
        for j in _best_first(score[i], masses[i]).tolist():
            if len(alts) >= alternatives or not finite[j]:
                break
            if j != b and apart[j]:  # other places, not the same spot again
                alts.append({"lat": float(pts[i, j, 0]), "lon": float(pts[i, j, 1]), "score": round(float(score[i, j]), 5),
                             "mass": {str(t): round(float(masses[i, k, j]), 5) for k, t in enumerate(THRESHOLDS_KM)
                                      if t in ALTERNATIVE_MASS_KM}})
                apart &= c[i, :, j] < near
        out.append(Decision(float(pts[i, b, 0]), float(pts[i, b, 1]),
                            {str(t): float(masses[i, k, b]) for k, t in enumerate(THRESHOLDS_KM)},
                            float(score[i, b]), alts,
                            {n: round(float(parts[i, j]), 4) for j, n in enumerate(ev.names)}, bool(dup[i]),
                            p_within[i], bool(constant[i])))
    return out


def backoff_only(p: FusionParams) -> bool:
    """True for the setting that answers the best constant guess: all weight on the prior, decided at 750 km."""
    return p.weight(BACKOFF_SIGNAL) == 1.0 and p.decision == "region"


def learned_summary(p: FusionParams, prior_only: float) -> str:
    """What fusion learned, in words, for the end of a build: which signals carry weight and what follows."""
    weights = "  ".join(f"{n} {100 * sp.weight:.0f}%" for n, sp in p.signals.items())
    prior = p.weight(BACKOFF_SIGNAL)
    if prior >= prior_only:
        meaning = ("on photographers it had not seen, this backbone's features did not beat the constant guess, "
                   "so most answers will be where the gallery's photos concentrate (each says 'little evidence'). "
                   "A stronger backbone (README, 'Stronger models') or more photos per place changes that.")
    else:
        carried = ", ".join(n for n, sp in p.signals.items() if n != BACKOFF_SIGNAL and sp.weight > 0)
        meaning = (f"the photo's own evidence ({carried}) carries the answers; the prior fills in where it is "
                   "weak, and an answer that rests on it says so.")
    return (f"fusion learned: {weights}\n  {meaning}\n  a gallery photo at least {p.duplicate_similarity:.2f} "
            "similar is a near-duplicate: the answer snaps to its spot." + _rerank_words(p.rerank))


def _rerank_words(r: dict[str, Any]) -> str:
    """The reranker's part of :func:`learned_summary` (nothing for bundles from before it)."""
    if not r:
        return ""
    change = "  ".join(f"{t} km {100 * r['mixture'][t]:.0f}->{100 * r['reranked'][t]:.0f}%"
                       for t in map(str, THRESHOLDS_KM))
    if not r.get("used"):
        return ("\n  a learned reranker of the candidates within the top cells did not clearly beat this mixture on "
                f"photographers it had not seen ({change}); the mixture answers.")
    region = r.get("region_km", 750.0)  # bundles from before the rule was chosen used 750 km
    rule = ("its best candidate answers" if not region else
            f"its best candidate names the region, the mixture's best spot within {region:.0f} km of it answers")
    if r.get("backoff_share"):
        rule += (f"; where even its best scores low ({100 * r['backoff_share']:.0f}% of photos), the best constant "
                 "guess answers")
    return (f"\n  a learned reranker picks the answer among ~{r['candidates_per_query']:.0f} candidates per photo "
            f"within the heads' top cells ({rule}): out of fold{f' on {n:,} photos' if (n := r.get('queries')) else ''} "
            f"{change}; it leans most on {', '.join(r['leans_on'])}.")

