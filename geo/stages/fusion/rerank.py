"""Reranking within the top cells: a learned scorer picks the answer among the signals' candidates.

The mixture (:mod:`geo.stages.fusion.posterior`) adds the signals' masses, so
a photo whose neighbours disagree is answered wherever most mass lands, and
its weights are one setting for every photo. PIGEON's gains come from the
other order: classify the geocell, then let retrieval pick the spot *inside*
the cells the heads trust. Here, per query:

* candidates are the support points that lie inside the heads' top cells
  (within :data:`CELL_REACH_KM` of one of the :data:`TOP_CELLS` most probable
  fine cells' spots): kNN neighbour spots, gallery points, cell spots, prior
  points; plus the best :data:`OUTSIDE` kNN neighbours and gallery points
  wherever they are (a confident kNN can still win) and the mixture's own answer;
* each candidate gets features (:func:`design`): every signal's mass within
  1/25/200/750/2500 km of it (the cells' mass within 200, 750 and 2500 km is
  the heads' probability of the candidate's region, country and continent:
  the coarser partition levels seen through the fine cells' spots), the same
  relative to the query's best candidate, the query's own evidence (top
  similarity, how concentrated each signal is), the candidate's source, rank
  and own mass, and the mixture's score, rank and distance to its answer;
* one gradient-boosted regressor scores it, and its best candidate answers, or
  names the region and the answer is the candidate with the most mixture score
  within 200 or 750 km of it: whichever rule (:data:`REGION_KMS`) scores better out of fold;
* where even its best candidate scores below a threshold learned out of fold,
  the photo shows no usable evidence and the best constant guess answers (the
  prior's 750-km anchor: the gallery photo with most gallery photos within 750 km).

Why one regressor on "the share of the thresholds met": the field's score,
and fusion's objective, is the mean of the accuracies at 1/25/200/750/2500 km;
the candidate whose expected share is highest is the Bayes answer for it, so
a pointwise regressor on that share is a listwise-consistent objective with
one model instead of five (a build-time cost the issue caps). Trees, not a
logistic model: the rule "trust the neighbour spot inside the trusted cell,
unless the neighbours are near-certain" is an interaction of features that a
linear score would need hand-made products for. ``p_within`` at 25/200/750 km
maps the ranker's score of the answer to how often such answers were that
close (isotonic, on cross-fitted scores of other photographers).

Why the constant guess below a score: a quarter of a realistic gallery's photos
(indoor, generic) carry no location signal. For them any spot the image
evidence names is a random gallery place, right within 750 km about as often
as the prior's density there (23.6 % on benchmarks/realistic.py at 150K), while
the one place with the most photos around it is right for 30.8 %. The ranker
scores those photos' candidates low but, fitted on every photo at once, still
picks among them; the threshold, chosen out of fold (each fold's photos
switched by the other folds' threshold), hands them to the constant guess.

Why more than one answer rule: on ``benchmarks/realistic.py`` at 10.5K photos (2,100
scored photos) every learned scorer moved answers into the right region
(+1.5 to +2 points at 750 km) but chose worse spots inside it, where the
mixture's kNN-weighted fine mass was the better estimate; at 150K with 4,000
to 12,000 scored photos the ranker's own pick beat the 750-km rule by 0.1-0.3
share points, and the mixture's best spot within 200 km of the pick beat both
(+0.26 over the own pick on 6,000; benchmarks/RESULTS.md, issue 24). How much
the ranker can be trusted with the spot depends on how much it saw, so the
build measures each.

It is fitted on fusion's out-of-fold evidence (whole photographers per fold),
cross-fitted again by photographer to measure it, and kept only where it beats
the mixture by a clustered standard error; otherwise the mixture answers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from geo.core.geodesy import EARTH_RADIUS_KM, THRESHOLDS_KM, cos_km, haversine_km, thresholds_met
from geo.core.priors import ANCHOR_KMS
from geo.core.splits import clustered_se, group_folds
from geo.stages.fusion.calibration import CALIBRATED_KM, expected_calibration_error, fit_isotonic
from geo.stages.fusion.posterior import (
    FusionParams,
    Mixed,
    Rescored,
    candidates,
    closeness,
    decide_batch,
    near_duplicate,
    signal_coverages,
    signal_masses,
)
from geo.stages.fusion.signals import BACKOFF_SIGNAL, CELLS, DUPLICATE_SIGNAL, GALLERY, KNN, Evidence
from geo.stages.fusion.trees import Trees

TOP_CELLS = 5
CELL_REACH_KM = 200.0
OUTSIDE = 3
CHUNK = 512  # queries per feature block: [chunk, candidates, features] stays a few tens of MB
TRAIN_PER_QUERY = 24  # candidates per query the regressor is fitted on (a seeded sample, the mixture's answer kept);
# at 6,000 queries 24 gave the same out-of-fold gain as 48 (+1.82 against +1.85 points) in 0.6x the time
FOLDS = 3
PEAK_KM = (25, 750)
# The answer rules tried out of fold: the ranker's own pick (0), or the mixture's best spot within this many km
# of it (the ranker names the region). The better on the gallery's photographers is kept.
REGION_KMS = (0.0, 200.0, 750.0)
# The back-off threshold tried: these quantiles of the ranker's best score per photo (0: never back off).
BACKOFF_QUANTILES = np.linspace(0.0, 0.5, 26)
BACKOFF_KM = 750.0  # the constant guess: the prior's anchor for this radius (geo.core.priors.ANCHOR_KMS)


@dataclass
class Reranker:
    """The fitted scorer, its calibration and what it learned (``summary``, for the build's words)."""

    trees: Trees
    features: list[str]
    calibration: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    region_km: float = 750.0  # 0: the ranker's pick answers; else the mixture's best spot this near it
    backoff_below: float | None = None  # below this best score the constant guess answers (None: never)

    def to_dict(self) -> dict[str, Any]:
        return {"features": self.features, "calibration": self.calibration, "summary": self.summary,
                "trees": self.trees.to_dict(), "top_cells": TOP_CELLS, "cell_reach_km": CELL_REACH_KM,
                "outside": OUTSIDE, "region_km": self.region_km,
                **({} if self.backoff_below is None else {"backoff_below": self.backoff_below})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Reranker":
        """The stored ranker; bundles from before the rule was chosen out of fold used the 750-km region, and
        those from before the back-off threshold never back off."""
        below = d.get("backoff_below")
        return cls(Trees.from_dict(d["trees"]), list(d["features"]), d.get("calibration", {}), d.get("summary", {}),
                   float(d.get("region_km", 750.0)), None if below is None else float(below))


def feature_names(names: list[str]) -> list[str]:
    cov = [f"{n} mass {t} km" for n in names for t in THRESHOLDS_KM]
    return [*cov, *(f"{c} / query best" for c in cov), *(f"query {n} peak {t} km" for n in names for t in PEAK_KM),
            "source", "rank in source", "own mass", "mixture score", "mixture score / best", "mixture rank",
            "is mixture answer", "km to mixture answer", "top kNN similarity", "inside top cells"]


def _column(ev: Evidence, per_signal: Callable[[int, Any], np.ndarray]) -> np.ndarray:
    return np.concatenate([per_signal(i, ev.signals[s.name]) for i, s in enumerate(ev.specs)], axis=-1)


def pool(ev: Evidence, p: FusionParams, c: np.ndarray, best: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([n, m] candidates the ranker chooses among, [n, m] inside the top cells)."""
    ok = candidates(ev, p)
    blocks = dict(zip(ev.names, ev.blocks()))
    if CELLS.name not in blocks:
        inside = ok.copy()
    else:
        b = blocks[CELLS.name]
        inside = (c[:, :, b.start:min(b.start + TOP_CELLS, b.stop)] >= cos_km(CELL_REACH_KM)).any(axis=2)
    allowed = ok & inside
    for name in (KNN.name, GALLERY.name):
        if name in blocks:
            b = blocks[name]
            first = slice(b.start, min(b.start + OUTSIDE, b.stop))
            allowed[:, first] |= ok[:, first]
    allowed[np.arange(len(best)), best] = True
    return allowed, inside


def design(ev: Evidence, p: FusionParams, c: np.ndarray, covered: list[np.ndarray],
           mixture: Mixed | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(features [n, m, F] float32, allowed [n, m], the mixture's answer [n], its scores [n, m]).

    ``c`` and ``covered`` are the mixture's :func:`closeness` and
    :func:`signal_coverages`, ``mixture`` its answer, scores and signal masses where the caller has them (a
    query's decision has: computing them again cost 0.7 ms of its answer on the realistic testbed)."""
    if mixture is None:
        mixture = (*decide_batch(ev, p, covered=covered)[:2], signal_masses(ev, p))
    best, score, masses = mixture
    n, m = score.shape
    rows = np.arange(n)
    allowed, inside = pool(ev, p, c, best)
    cov = np.concatenate([cv.transpose(0, 2, 1) for cv in covered], axis=2)  # [n, m, S*T]
    peak = cov.max(axis=1, keepdims=True)
    keep = [i * len(THRESHOLDS_KM) + THRESHOLDS_KM.index(t) for i in range(len(covered)) for t in PEAK_KM]
    src = _column(ev, lambda i, e: np.full(e.width, float(i)))
    rank = _column(ev, lambda i, e: np.arange(e.width, dtype=np.float64))
    own = np.concatenate(masses, axis=-1)
    fs = np.where(np.isfinite(score), score, 0.0)
    fs_rel = fs / np.maximum(fs.max(axis=1, keepdims=True), 1e-12)
    frank = np.argsort(np.argsort(-score, axis=1, kind="stable"), axis=1)
    km = np.arccos(np.clip(c[rows, best, :], -1.0, 1.0)) * EARTH_RADIUS_KM
    knn = ev.signals[DUPLICATE_SIGNAL].score if DUPLICATE_SIGNAL in ev.signals else np.full((n, 1), -np.inf)
    top = np.max(np.where(np.isfinite(knn), knn, -1.0), axis=1, initial=-1.0)
    per_candidate = [src[None].repeat(n, 0), rank[None].repeat(n, 0), own, fs, fs_rel, frank,
                     (np.arange(m)[None] == best[:, None]), np.log1p(km), top[:, None].repeat(m, 1), inside]
    x = np.concatenate([cov, cov / np.maximum(peak, 1e-12), peak[..., keep].repeat(m, 1),
                        np.stack([np.asarray(a, np.float64) for a in per_candidate], axis=2)], axis=2)
    return x.astype(np.float32), allowed, best, score


@dataclass
class _Rows:
    """Every query's allowed candidates, flattened: features, query, km to the truth, the mixture's answer."""

    x: np.ndarray
    query: np.ndarray
    km: np.ndarray
    mixture: np.ndarray  # bool: the candidate is the mixture's answer
    mixed: np.ndarray  # the mixture's score of the candidate
    latlon: np.ndarray  # [rows, 2] the candidate's place

    def share(self) -> np.ndarray:
        return thresholds_met(self.km)


def backoff_pick(ev: Evidence) -> int | None:
    """The candidate column of the best constant guess at :data:`BACKOFF_KM`: the prior's weightless anchor
    (:data:`geo.core.priors.ANCHOR_KMS`, after its weighted points; the same for every query). None where the
    evidence has no such anchor. Not the candidate with most prior mass: the prior's few dozen points are too
    coarse for that (on the 150K testbed it named kNN spots, 0.12 share points worse than the anchor)."""
    if BACKOFF_SIGNAL not in ev.names:
        return None
    b = ev.blocks()[ev.names.index(BACKOFF_SIGNAL)]
    col = b.stop - len(ANCHOR_KMS) + ANCHOR_KMS.index(BACKOFF_KM)
    weightless = ev.signals[BACKOFF_SIGNAL].score[:, col - b.start] == 0 if col >= b.start else np.zeros(1, bool)
    return col if weightless.all() else None


def _rows(ev: Evidence, p: FusionParams, truth: np.ndarray) -> tuple[_Rows, np.ndarray | None]:
    """(the out-of-fold queries' candidates and features, [n] km from each query's constant guess to its truth),
    computed a chunk of queries at a time."""
    parts, fallback = [], []
    for r0 in range(0, len(ev), CHUNK):
        rows = np.arange(r0, min(r0 + CHUNK, len(ev)))
        sub = ev.take(rows)
        c = closeness(sub)
        covered = signal_coverages(sub, p, c)
        x, allowed, best, mixed = design(sub, p, c, covered)
        q, j = np.nonzero(allowed)
        pts = sub.points[q, j]
        km = haversine_km(pts[:, 0], pts[:, 1], truth[rows[q], 0], truth[rows[q], 1])
        parts.append(_Rows(x[q, j], rows[q], km, best[q] == j, mixed[q, j], pts))
        if (col := backoff_pick(sub)) is not None:
            guess = sub.points[:, col]
            fallback.append(haversine_km(guess[:, 0], guess[:, 1], truth[rows, 0], truth[rows, 1]))
    return (_Rows(*(np.concatenate([getattr(pt, f) for pt in parts])
                    for f in ("x", "query", "km", "mixture", "mixed", "latlon"))),
            np.concatenate(fallback) if fallback else None)


def _sample(d: _Rows, keep: np.ndarray, seed: int) -> np.ndarray:
    """Flat row indices to fit on: up to TRAIN_PER_QUERY candidates of each kept query, its mixture answer first."""
    key = np.random.default_rng(seed).random(len(d.query)) + 2.0 * d.mixture
    order = np.lexsort((-key, d.query))
    starts = np.searchsorted(d.query[order], d.query[order])  # where each row's query begins in ``order``
    pick = order[(np.arange(len(order)) - starts) < TRAIN_PER_QUERY]
    return np.sort(pick[keep[d.query[pick]]])


def _fit(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[Any, Trees, np.ndarray]:
    """(the fitted scikit-learn model, its trees as arrays, each feature's share of the split gain). The model
    scores the build's own cross-fit (compiled, ~10x the arrays' speed on 100K+ rows); the arrays are stored."""
    from sklearn.ensemble import HistGradientBoostingRegressor  # build time only; the query side walks arrays
    from threadpoolctl import threadpool_limits

    model = HistGradientBoostingRegressor(max_iter=100, learning_rate=0.1, max_leaf_nodes=15, min_samples_leaf=40,
                                          l2_regularization=1.0, early_stopping=False, random_state=seed)
    with threadpool_limits(1):  # small trees: OpenMP's threads cost more in waiting than they save (20x on 2 busy cores)
        model.fit(x, y)
    gain = np.zeros(x.shape[1])
    for pr in model._predictors:
        nodes = pr[0].nodes[pr[0].nodes["is_leaf"] == 0]
        np.add.at(gain, nodes["feature_idx"], nodes["gain"])
    return model, Trees.from_sklearn(model), gain / max(gain.sum(), 1e-12)


def _best(d: _Rows, score: np.ndarray, n: int) -> np.ndarray:
    """[n] flat row of each query's best-scored candidate."""
    order = np.lexsort((-score, d.query))
    first = np.searchsorted(d.query[order], np.arange(n))
    return order[first]


def _in_region(d: _Rows, region: np.ndarray, n: int, region_km: float) -> np.ndarray:
    """[n] flat row of each query's answer: the mixture's best candidate within ``region_km`` of ``region`` (the
    ranker's pick, a flat row per query; itself when nothing else is that close, or ``region_km`` is 0)."""
    if region_km <= 0:
        return region
    centre = d.latlon[region[d.query]]
    near = haversine_km(d.latlon[:, 0], d.latlon[:, 1], centre[:, 0], centre[:, 1]) <= region_km
    spot = _best(d, np.where(near, d.mixed, -np.inf), n)
    return np.where(np.isfinite(d.mixed[spot]) & (d.query[spot] == np.arange(n)), spot, region)


def accuracy_km(km: np.ndarray) -> dict[str, float]:
    """The field's accuracies (fractions) and the median error of these errors in km."""
    return {**{str(t): round(float(np.mean(km <= t)), 4) for t in THRESHOLDS_KM}, "median_km": round(float(np.median(km)), 1)}


def fit_reranker(ev: Evidence, p: FusionParams, truth: np.ndarray, groups: np.ndarray | None,
                 log: Callable[[str], None] = print,
                 seed: int = 0) -> tuple[Reranker | None, dict[str, Any], np.ndarray]:
    """(the ranker fitted on out-of-fold evidence, or None where it does not beat the mixture ``p`` out of fold;
    its report; each query's cross-fitted answer's km to the truth: the ranker's where kept, else the mixture's).

    Its own measure is cross-fitted by photographer (``groups``): each fold's
    queries are ranked by a model fitted on the other photographers'. The
    answer rule (:data:`REGION_KMS`) is the one with the higher cross-fitted
    share, then the back-off to the constant guess below a score (:func:`_backoff`,
    nested out of fold). It is kept only where its per-photo share of thresholds met beats
    the mixture's by more than one clustered standard error; near-duplicates
    keep the mixture's answer (the out-of-fold data never shows one).
    """
    from threadpoolctl import threadpool_limits  # scikit-learn's; build time only

    n = len(ev)
    d, fallback_km = _rows(ev, p, truth)
    y = d.share()
    dup = near_duplicate(ev, p)
    fold = group_folds(n, groups, FOLDS, seed)
    pred = np.full(len(y), -np.inf)
    for f in range(FOLDS):
        held = fold[d.query] == f
        train = _sample(d, (fold != f) & ~dup, seed)
        if held.any() and len(train):
            model, _, _ = _fit(d.x[train], y[train], seed)
            with threadpool_limits(1):
                pred[held] = model.predict(d.x[held])
    mixture = _best(d, d.mixture.astype(np.float64), n)
    ranked = _best(d, pred, n)
    rules = {km: np.where(dup, mixture, _in_region(d, ranked, n, km)) for km in REGION_KMS}
    region_km = max(rules, key=lambda km: y[rules[km]].mean())
    chosen = rules[region_km]
    below, backed = _backoff(pred[ranked], d.km[chosen], fallback_km, fold, dup)
    km = np.where(backed, fallback_km, d.km[chosen]) if fallback_km is not None else d.km[chosen]
    diff = thresholds_met(km) - y[mixture]
    gain, se = float(diff.mean()), clustered_se(diff, groups)
    report = {"mixture": accuracy_km(d.km[mixture]), "reranked": accuracy_km(km),
              "gain": round(gain, 4), "se": round(se, 4), "candidates_per_query": round(len(y) / max(n, 1), 1),
              "region_km": region_km, "backoff_share": round(float(backed.mean()), 4), "queries": int(n)}
    log(f"fusion reranker out of fold ({n:,} photos): share of thresholds met {100 * y[mixture].mean():.1f}% -> "
        f"{100 * thresholds_met(km).mean():.1f}% ({100 * gain:+.1f} +- {100 * se:.1f} points)")
    if not gain > se:
        log("fusion reranker: not clearly better than the mixture on other photographers; the mixture answers")
        return None, {**report, "used": False}, d.km[mixture]
    _, trees, importance = _fit(d.x[(s := _sample(d, ~dup, seed))], y[s], seed)
    names = feature_names(ev.names)
    calib, ece = _calibration(pred[ranked[~dup]], km[~dup], fold[~dup])
    top = [names[i] for i in np.argsort(-importance)[:3]]
    summary = {**report, "used": True, "ece": ece, "leans_on": top}
    return Reranker(trees, names, calib, summary, region_km, below), summary, km


def _backoff(top: np.ndarray, answer_km: np.ndarray, fallback_km: np.ndarray | None, fold: np.ndarray,
             dup: np.ndarray) -> tuple[float | None, np.ndarray]:
    """(the best-score threshold below which the constant guess answers, fitted on every photo; [n] True where a
    photo is backed off out of fold: each fold's photos by the threshold the other folds chose). None and no
    photo where the guess never scores more; near-duplicates are never backed off."""
    backed = np.zeros(len(top), bool)
    if fallback_km is None:
        return None, backed
    gain = thresholds_met(fallback_km) - thresholds_met(answer_km)
    for f in np.unique(fold):
        other = (fold != f) & ~dup
        if (below := _threshold(top[other], gain[other])) is not None:
            backed |= (fold == f) & ~dup & (top < below)
    return _threshold(top[~dup], gain[~dup]), backed


def _threshold(top: np.ndarray, gain: np.ndarray) -> float | None:
    """The score among :data:`BACKOFF_QUANTILES` of ``top`` below which backing off gains most share in total,
    or None where no threshold gains."""
    if not len(top):
        return None
    totals = {float(t): float(gain[top < t].sum()) for t in np.quantile(top, BACKOFF_QUANTILES)}
    best = max(totals, key=totals.get)
    return best if totals[best] > 0 else None


def _calibration(score: np.ndarray, km: np.ndarray,
                 fold: np.ndarray) -> tuple[dict[str, dict[str, list[float]]], dict[str, float]]:
    """Isotonic maps ranker score -> how often the answer was within 25/200/750 km, and their expected
    calibration error on photographers the map was not fitted on (each fold mapped by the others' fit)."""
    calib, ece = {}, {}
    for t in CALIBRATED_KM:
        hit = km <= float(t)
        calib[t] = fit_isotonic(score, hit)
        prob = np.zeros(len(score))
        for f in np.unique(fold):
            m = fold == f
            c = fit_isotonic(score[~m], hit[~m]) if (~m).any() else calib[t]
            prob[m] = np.interp(score[m], c["x"], c["y"])
        ece[t] = round(expected_calibration_error(prob, hit), 4)
    return calib, ece


def rescorer(r: Reranker) -> Callable[..., Rescored]:
    """The query side's reranking for :func:`geo.stages.fusion.posterior.decide`: (ev, params, closeness,
    coverages, what the mixture computed) -> (best [n], scores [n, m], calibrated ``p_within`` per query, empty
    where the mixture kept the answer, a near-duplicate; [n] True where the constant guess answered), a chunk of
    queries at a time so the features stay a few tens of MB."""
    def rescore(ev: Evidence, p: FusionParams, c: np.ndarray, covered: list[np.ndarray], mixture: Mixed) -> Rescored:
        parts = [_rescore_chunk(r, ev.take(rows), p, c[rows], [cv[rows] for cv in covered],
                                (mixture[0][rows], mixture[1][rows], [m[rows] for m in mixture[2]]))
                 for rows in (np.arange(r0, min(r0 + CHUNK, len(ev))) for r0 in range(0, len(ev), CHUNK))]
        return (np.concatenate([b for b, _, _, _ in parts]), np.concatenate([s for _, s, _, _ in parts]),
                [x for _, _, pw, _ in parts for x in pw], np.concatenate([k for _, _, _, k in parts]))
    return rescore


def _rescore_chunk(r: Reranker, ev: Evidence, p: FusionParams, c: np.ndarray, covered: list[np.ndarray],
                   mixture: Mixed) -> Rescored:
    x, allowed, best, mixed = design(ev, p, c, covered, mixture)
    score = np.full(allowed.shape, -np.inf)
    score[allowed] = r.trees.predict(x[allowed])
    rows = np.arange(len(best))
    region = score.argmax(axis=1)
    top = score[rows, region]
    if r.region_km > 0:
        inside = allowed & (c[rows, region, :] >= cos_km(r.region_km))
        spot = np.where(inside, mixed, -np.inf).argmax(axis=1)
        spot = np.where(np.isfinite(mixed[rows, spot]) & inside[rows, spot], spot, region)
    else:
        spot = region
    dup = near_duplicate(ev, p)
    constant = np.zeros(len(best), bool)
    if r.backoff_below is not None and (guess := backoff_pick(ev)) is not None:
        constant = (top < r.backoff_below) & ~dup  # no usable evidence: the constant guess answers
        spot = np.where(constant, guess, spot)
    score[rows, spot] = np.nextafter(top, np.inf)  # the answer first; alternatives follow in the ranker's order
    score[dup] = mixed[dup]
    out = np.where(dup, best, spot)
    maps = [(t, r.calibration[t]) for t in CALIBRATED_KM if t in r.calibration]
    return out, score, [{} if dup[i] else {t: round(float(np.interp(top[i], m["x"], m["y"])), 4) for t, m in maps}
                        for i in range(len(out))], constant


def fits(r: Reranker, ev: Evidence) -> bool:
    """True where the evidence has the signals the reranker was fitted on, in the same order."""
    return r.features == feature_names(ev.names)
