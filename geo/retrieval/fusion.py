"""Fusion: one posterior from image neighbours, the GPS gallery, cell priors and the population prior.

Each signal becomes probability mass on points of the globe:

* kNN:     softmax(similarity / T) of the image neighbours, at their coordinates;
* gallery: softmax(score / T) of the top gallery points, at their coordinates;
* cells:   the top-K fine cells' hierarchical (f*) probabilities, at their Class2GPS points;
* prior:   the gallery's photo distribution, summarised as a few weighted points.

The posterior is the mixture ``sum_s w_s * signal_s``. The answer is the
support point with the most posterior mass within the field's thresholds
(1/25/200/750/2500 km, averaged): at the coarse thresholds the cells and the
prior decide the region (PIGEON's "refine within the top cells"), at the fine
ones kNN and gallery support pick the spot inside it. With weak image evidence
the prior's weight makes the answer the best constant guess; a near-duplicate
neighbour (similarity above anything seen between different photographers)
takes all the weight, so it wins outright.

Weights, temperatures and K are fitted at build time on out-of-fold evidence:
the gallery's photographers are split into folds and each fold is scored
against a scratch bundle built from the others (:func:`out_of_fold`), because
every signal of the real bundle contains the gallery photos themselves. The
probability that the answer lies within 25/200/750 km is calibrated on the
same evidence by isotonic regression of the posterior mass.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from geo.geodesy import EARTH_RADIUS_KM, haversine_km, pairwise_haversine_km
from geo.splits import clustered_se

THRESHOLDS_KM = (1.0, 25.0, 200.0, 750.0, 2500.0)
# Which thresholds' mass the decision maximises: all five (the field's mean accuracy), only the
# coarse ones, where weak evidence still carries information, or the region (750 km) alone, which
# with the prior alone is exactly the best constant guess.
DECISIONS = {"all": (1.0, 1.0, 1.0, 1.0, 1.0), "coarse": (0.0, 0.0, 0.0, 1.0, 1.0), "region": (0.0, 0.0, 0.0, 1.0, 0.0)}
CALIBRATED_KM = ("25", "200", "750")


@dataclass
class FusionParams:
    w_cells: float = 0.4
    w_knn: float = 0.2
    w_gallery: float = 0.2
    w_prior: float = 0.2
    knn_temperature: float = 0.05
    gallery_temperature: float = 1.0
    top_cells: int = 32
    gallery_k: int = 32
    # A neighbour at least this similar is a near-duplicate: the answer snaps to the kNN evidence.
    # Set at build above any similarity seen between different photographers' photos.
    duplicate_similarity: float = 0.95
    decision: str = "all"
    calibration: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FusionParams":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class Evidence:
    """A batch of queries' raw signals, padded to fixed widths, best-first (any width may be 0).

    Padding has similarity/score -inf and probability 0, so it carries no mass.
    """

    knn_latlon: np.ndarray          # [n, k, 2]
    knn_sim: np.ndarray             # [n, k]
    gallery_latlon: np.ndarray      # [n, g, 2]
    gallery_score: np.ndarray       # [n, g]
    cell_latlon: np.ndarray         # [n, c, 2]  top fine cells' Class2GPS points
    cell_prob: np.ndarray           # [n, c]     their hierarchical probabilities
    prior_latlon: np.ndarray        # [n, r, 2]  the densest cells' Class2GPS points (same for every query)
    prior_prob: np.ndarray          # [n, r]     their share of the gallery: the population prior

    def __len__(self) -> int:
        return len(self.knn_sim)

    @staticmethod
    def concat(parts: list["Evidence"]) -> "Evidence":
        """Stack batches whose widths differ (padding carries no mass)."""
        names = ("knn", "gallery", "cell", "prior")
        out = {}
        for name in names:
            score_attr = {"knn": "knn_sim", "gallery": "gallery_score", "cell": "cell_prob", "prior": "prior_prob"}[name]
            pad = -np.inf if name in ("knn", "gallery") else 0.0
            width = max(getattr(e, score_attr).shape[1] for e in parts)
            out[score_attr] = np.concatenate([np.pad(getattr(e, score_attr).astype(np.float64),
                                                     ((0, 0), (0, width - getattr(e, score_attr).shape[1])),
                                                     constant_values=pad) for e in parts])
            ll = f"{name}_latlon"
            fill = np.nan if name == "prior" else 0.0  # prior points are candidates wherever they are finite
            out[ll] = np.concatenate([np.pad(getattr(e, ll), ((0, 0), (0, width - getattr(e, ll).shape[1]), (0, 0)),
                                             constant_values=fill) for e in parts])
        return Evidence(**out)

    @property
    def points(self) -> np.ndarray:
        """Support points [n, k + g + c, 2]: every signal's locations, which are also the candidates."""
        return np.concatenate([self.knn_latlon, self.gallery_latlon, self.cell_latlon, self.prior_latlon], axis=1)


@dataclass
class Decision:
    lat: float
    lon: float
    mass: dict[str, float]          # posterior mass within each threshold of the answer
    score: float                    # mean of those masses: the expected share of thresholds met
    alternatives: list[dict[str, float]]


def _softmax_rows(z: np.ndarray, t: float) -> np.ndarray:
    if z.shape[1] == 0:
        return np.zeros_like(z, dtype=np.float64)
    z = z.astype(np.float64) / t
    m = np.max(np.where(np.isfinite(z), z, -np.inf), axis=1, keepdims=True)
    e = np.where(np.isfinite(z), np.exp(z - np.where(np.isfinite(m), m, 0.0)), 0.0)
    s = e.sum(axis=1, keepdims=True)
    return np.divide(e, s, out=np.zeros_like(e), where=s > 0)


def _normalise(x: np.ndarray) -> np.ndarray:
    s = x.sum(axis=1, keepdims=True)
    return np.divide(x, s, out=np.zeros_like(x), where=s > 0)


def prior_summary(lat: np.ndarray, lon: np.ndarray, max_points: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The gallery's photo distribution as at most ``max_points`` weighted points (the population prior),
    followed by the best constant guesses at 750 and 2500 km as weightless candidates.

    Photos are grouped by S2 cell at the finest level that leaves no more than
    ``max_points`` occupied cells; each group is its spherical mean with its
    share of the photos. Small enough to score against every candidate per query.
    """
    from geo.cells import s2
    from geo.geodesy import latlon_to_xyz, xyz_to_latlon

    ok = np.isfinite(lat) & np.isfinite(lon)
    leaf = s2.leaf_ids(lat[ok], lon[ok])
    for level in range(12, -1, -1):
        cells, inv = np.unique(s2.parent_ids(leaf, level), return_inverse=True)
        if len(cells) <= max_points:
            break
    xyz = latlon_to_xyz(lat[ok], lon[ok])
    sums = np.stack([np.bincount(inv, weights=xyz[:, a], minlength=len(cells)) for a in range(3)], 1)
    plat, plon = xyz_to_latlon(sums)
    counts = np.bincount(inv, minlength=len(cells)).astype(np.float64)
    anchors = np.stack([population_prior(lat, lon, r) for r in (750.0, 2500.0)])
    return np.concatenate([np.stack([plat, plon], -1), anchors]), np.concatenate([counts / counts.sum(), [0.0, 0.0]])


def population_prior(lat: np.ndarray, lon: np.ndarray, radius_km: float = 750.0, max_photos: int = 2000) -> np.ndarray:
    """The best constant guess: the gallery photo with the most gallery photos within ``radius_km``.

    Exact up to ``max_photos`` photos; a seeded sample of them beyond (the answer moves little).
    """
    ok = np.flatnonzero(np.isfinite(lat) & np.isfinite(lon))
    if len(ok) > max_photos:
        ok = np.sort(np.random.default_rng(0).choice(ok, max_photos, replace=False))
    d = pairwise_haversine_km(lat[ok], lon[ok], lat[ok], lon[ok])
    i = ok[int(np.argmax((d <= radius_km).sum(axis=1)))]
    return np.array([lat[i], lon[i]])


def signal_masses(ev: Evidence, p: FusionParams) -> list[np.ndarray]:
    """Each signal's own distribution over its support points (rows sum to 1, or 0 when absent)."""
    cells = ev.cell_prob.astype(np.float64).copy()
    cells[:, p.top_cells:] = 0.0
    gal = ev.gallery_score.astype(np.float64).copy()
    gal[:, p.gallery_k:] = -np.inf
    return [_softmax_rows(ev.knn_sim, p.knn_temperature), _softmax_rows(gal, p.gallery_temperature),
            _normalise(cells), _normalise(ev.prior_prob.astype(np.float64))]


def near_duplicate(ev: Evidence, p: FusionParams) -> np.ndarray:
    """[n] True where the best neighbour is at least ``duplicate_similarity`` similar."""
    top = np.max(np.where(np.isfinite(ev.knn_sim), ev.knn_sim, -np.inf), axis=1, initial=-np.inf)
    return top >= p.duplicate_similarity


def signal_weights(ev: Evidence, p: FusionParams) -> np.ndarray:
    """[n, 4] mixture weights (knn, gallery, cells, prior).

    Absent signals' weight goes to the present ones, and a near-duplicate
    neighbour (similarity above ``duplicate_similarity``) takes all of it.
    """
    present = np.stack([np.isfinite(ev.knn_sim).any(axis=1), np.isfinite(ev.gallery_score).any(axis=1),
                        (ev.cell_prob > 0).any(axis=1), (ev.prior_prob > 0).any(axis=1)], axis=1)
    w = np.where(present, np.array([p.w_knn, p.w_gallery, p.w_cells, p.w_prior], np.float64), 0.0)
    w[near_duplicate(ev, p)] = [1.0, 0.0, 0.0, 0.0]
    fallback = w.sum(axis=1) == 0
    w[fallback] = present[fallback].astype(np.float64)
    return w / w.sum(axis=1, keepdims=True).clip(min=1e-12)


def closeness(ev: Evidence) -> np.ndarray:
    """[n, m, m] cosine of the angle between every pair of support points (which are also the candidates).

    Only comparisons with the thresholds are needed, and ``d <= t`` is
    ``cos(d / R) >= cos(t / R)``: a batched 3-vector product instead of a
    haversine per pair keeps fusion inside its latency budget.
    """
    from geo.geodesy import latlon_to_xyz

    xyz = latlon_to_xyz(ev.points[..., 0], ev.points[..., 1])  # float64: cos(1 km / R) is 1 - 1.2e-8
    return np.nan_to_num(np.einsum("nid,njd->nij", xyz, xyz), nan=-2.0)  # NaN padding is never within reach


def _cos_km(km: float) -> float:
    return float(np.cos(min(km / EARTH_RADIUS_KM, np.pi)))


def _block_slices(ev: Evidence) -> list[slice]:
    widths = np.cumsum([0] + [x.shape[1] for x in (ev.knn_sim, ev.gallery_score, ev.cell_prob, ev.prior_prob)])
    return [slice(int(widths[i]), int(widths[i + 1])) for i in range(4)]


def coverage(c: np.ndarray, ev: Evidence, block: int, mass: np.ndarray) -> np.ndarray:
    """[n, thresholds, m]: mass of one signal within each threshold of every candidate (``c`` from :func:`closeness`)."""
    cb = c[:, :, _block_slices(ev)[block]]
    m = mass[:, :, None].astype(np.float32)
    return np.stack([(cb >= _cos_km(t)).astype(np.float32) @ m for t in THRESHOLDS_KM], axis=1)[..., 0]


def decide_batch(ev: Evidence, p: FusionParams, covered: list[np.ndarray] | None = None,
                 c: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(best candidate [n], candidate scores [n, m], posterior mass within each threshold [n, T, m]).

    ``covered`` (each signal's :func:`coverage`) may be passed in when many
    settings share the signals' masses, as in tuning.
    """
    if covered is None:
        c = closeness(ev) if c is None else c
        covered = [coverage(c, ev, b, m) for b, m in enumerate(signal_masses(ev, p))]
    w = signal_weights(ev, p)
    masses = sum(c * w[:, b, None, None].astype(np.float32) for b, c in enumerate(covered))
    u = np.tile(np.asarray(DECISIONS[p.decision], np.float32), (len(ev), 1))
    u[near_duplicate(ev, p)] = DECISIONS["all"]  # a near-duplicate is answered at its spot, not just its region
    score = np.where(candidates(ev, p), np.einsum("ntm,nt->nm", masses, u / u.sum(axis=1, keepdims=True)), -np.inf)
    return score.argmax(axis=1), score, masses


def candidates(ev: Evidence, p: FusionParams) -> np.ndarray:
    """[n, m] True for real candidates: padding and cells or gallery points beyond the top-K are dropped."""
    g = np.isfinite(ev.gallery_score) & (np.arange(ev.gallery_score.shape[1]) < p.gallery_k)
    c = (ev.cell_prob > 0) & (np.arange(ev.cell_prob.shape[1]) < p.top_cells)
    return np.concatenate([np.isfinite(ev.knn_sim), g, c, np.isfinite(ev.prior_latlon[..., 0])], axis=1)


def decide(ev: Evidence, p: FusionParams, alternatives: int = 5) -> list[Decision]:
    c = closeness(ev)
    best, score, masses = decide_batch(ev, p, c=c)
    pts = ev.points
    out = []
    for i, b in enumerate(best):
        order = np.argsort(-score[i], kind="stable")
        alts, taken = [], [int(b)]
        for j in order[1:]:
            if len(alts) >= alternatives or not np.isfinite(score[i, j]):
                break
            if (c[i, j, taken] < _cos_km(25.0)).all():  # alternatives are other places, not the same spot again
                alts.append({"lat": float(pts[i, j, 0]), "lon": float(pts[i, j, 1]), "score": round(float(score[i, j]), 5)})
                taken.append(int(j))
        out.append(Decision(float(pts[i, b, 0]), float(pts[i, b, 1]),
                            {str(int(t)): float(masses[i, k, b]) for k, t in enumerate(THRESHOLDS_KM)},
                            float(score[i, b]), alts))
    return out


# ---------------------------------------------------------------- calibration
def fit_isotonic(x: np.ndarray, hit: np.ndarray) -> dict[str, list[float]]:
    """Monotone map posterior mass -> observed frequency, stored as breakpoints for np.interp."""
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(x, hit.astype(float))
    return {"x": [float(v) for v in iso.X_thresholds_], "y": [float(v) for v in iso.y_thresholds_]}


def calibrated(mass: dict[str, float], calibration: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    out = {}
    for t in CALIBRATED_KM:
        c = calibration.get(t)
        out[t] = round(float(np.interp(mass[t], c["x"], c["y"])) if c and c["x"] else mass[t], 4)
    return out


def expected_calibration_error(prob: np.ndarray, hit: np.ndarray, bins: int = 10) -> float:
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(prob, edges) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            ece += sel.mean() * abs(prob[sel].mean() - hit[sel].mean())
    return float(ece)


def reliability_table(prob: np.ndarray, hit: np.ndarray, bins: int = 5) -> list[dict[str, float]]:
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(prob, edges) - 1, 0, bins - 1)
    return [{"bin": f"{edges[b]:.1f}-{edges[b + 1]:.1f}", "n": int((idx == b).sum()),
             "predicted": round(float(prob[idx == b].mean()), 3), "observed": round(float(hit[idx == b].mean()), 3)}
            for b in range(bins) if (idx == b).any()]


# ---------------------------------------------------------------- tuning
def accuracy(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    e = haversine_km(pred[:, 0], pred[:, 1], truth[:, 0], truth[:, 1])
    out = {str(int(t)): float(np.mean(e <= t)) for t in THRESHOLDS_KM}
    out["median_km"] = float(np.median(e))
    return out


def select_one_se(scored: list[tuple[np.ndarray, "FusionParams"]], groups: np.ndarray | None = None) -> "FusionParams":
    """Back off to the prior unless the evidence clearly beats it; then the most prior-leaning close setting.

    ``scored`` pairs each setting with its per-photo score (share of thresholds
    met). Tuning data are a few hundred photos of a few dozen photographers,
    and the best of hundreds of settings is optimistic (on the Im2GPS3k dev
    folds, the arg-max lost 8 points at 2500 km on held-out photographers). So
    the best setting must beat the prior alone (the best constant guess) by two
    paired standard errors (clustered by photographer when ``groups`` are
    given); if it does, the setting chosen is the most prior-leaning one within
    one standard error of the best.
    """
    means = np.array([s.mean() for s, _ in scored])
    top = int(np.argmax(means))

    def se(i: int) -> float:
        return clustered_se(scored[top][0] - scored[i][0], groups)

    prior_only = [i for i, (_, p) in enumerate(scored) if p.w_prior == 1.0 and p.decision == "region"]
    if prior_only and means[top] - means[prior_only[0]] <= 2 * se(prior_only[0]):
        return scored[prior_only[0]][1]
    ok = [i for i in range(len(scored)) if means[i] >= means[top] - se(i)]
    return scored[max(ok, key=lambda i: (scored[i][1].w_prior, scored[i][1].w_cells, means[i]))][1]


def grid(has_cells: bool, has_gallery: bool) -> list[FusionParams]:
    """Candidate settings: weights on a simplex (steps of 0.125) over the built signals, temperatures, K.

    The prior (the cells' photo counts) exists only with cells."""
    steps = np.arange(0, 1.0001, 0.125)
    out = []
    for wc, wk, wp in itertools.product(steps if has_cells else [0.0], steps, steps if has_cells else [0.0]):
        wg = 1.0 - wc - wk - wp
        if wg < -1e-9 or (not has_gallery and wg > 1e-9):
            continue
        for kt, gt, tc, dec in itertools.product((0.02, 0.05, 0.1), (0.5, 1.0, 2.0) if has_gallery else (1.0,),
                                                 (8, 32) if has_cells else (0,), DECISIONS):
            out.append(FusionParams(float(wc), float(wk), float(max(wg, 0.0)), float(wp), kt, gt, tc, decision=dec))
    return out


def duplicate_threshold(knn_sim: np.ndarray, quantile: float = 1.0, margin: float = 0.02) -> float:
    """A similarity above what photos of *other* photographers reach (out-of-fold top-1 similarities).

    Tuning data is photographer-disjoint, so it never shows what a near-duplicate
    is worth; this threshold marks where such matches begin instead.
    """
    top = np.max(np.where(np.isfinite(knn_sim), knn_sim, -np.inf), axis=1)
    top = top[np.isfinite(top)]
    return float(min(0.99, np.quantile(top, quantile) + margin)) if len(top) else FusionParams.duplicate_similarity


def tune(ev: Evidence, truth: np.ndarray, has_cells: bool, has_gallery: bool, groups: np.ndarray | None = None,
         log=print) -> tuple[FusionParams, dict[str, Any]]:
    """Fit weights/temperatures maximising the mean of the five threshold accuracies, then calibrate."""
    pts = ev.points
    rows = np.arange(len(ev))
    c = closeness(ev)
    cache: dict[tuple, np.ndarray] = {}

    def covered(p: FusionParams) -> list[np.ndarray]:
        keys = [("knn", p.knn_temperature), ("gallery", p.gallery_temperature, p.gallery_k), ("cells", p.top_cells), ("prior",)]
        masses = None
        for key in keys:
            if key not in cache:
                masses = masses or signal_masses(ev, p)
                b = keys.index(key)
                cache[key] = coverage(c, ev, b, masses[b])
        return [cache[k] for k in keys]

    dup = duplicate_threshold(ev.knn_sim)
    scored = []
    for p in grid(has_cells, has_gallery):
        p.duplicate_similarity = dup
        b, _, _ = decide_batch(ev, p, covered(p))
        err = haversine_km(pts[rows, b, 0], pts[rows, b, 1], truth[:, 0], truth[:, 1])
        scored.append((np.mean([err <= t for t in THRESHOLDS_KM], axis=0), p))
    best = select_one_se(scored, groups)
    b, _, masses = decide_batch(ev, best, covered(best))
    best_acc = accuracy(pts[rows, b], truth)
    b, _, masses = decide_batch(ev, best, covered(best))
    pred = pts[rows, b]
    err = haversine_km(pred[:, 0], pred[:, 1], truth[:, 0], truth[:, 1])
    calib, ece, reliability = {}, {}, {}
    for t in CALIBRATED_KM:
        x = masses[rows, THRESHOLDS_KM.index(float(t)), b].astype(np.float64)
        hit = err <= float(t)
        calib[t] = fit_isotonic(x, hit)
        prob = np.interp(x, calib[t]["x"], calib[t]["y"])
        ece[t] = {"raw": round(expected_calibration_error(x, hit), 4),
                  "calibrated": round(expected_calibration_error(prob, hit), 4)}
        reliability[t] = reliability_table(prob, hit)
    best.calibration = calib
    log(f"fusion: w_cells {best.w_cells}, w_knn {best.w_knn}, w_gallery {best.w_gallery}, w_prior {best.w_prior}, "
        f"T_knn {best.knn_temperature}, T_gallery {best.gallery_temperature}, top cells {best.top_cells}, "
        f"decision {best.decision}, near-duplicate at similarity >= {best.duplicate_similarity:.3f}")
    return best, {"validation": best_acc, "ece": ece, "reliability": reliability}


# ---------------------------------------------------------------- build stage
FUSION_FILE = "fusion/fusion.json"


def out_of_fold(meta, emb: np.ndarray, folds: np.ndarray, backbone: dict[str, Any], has_cells: bool,
                has_gallery: bool, stage_options: dict[str, Any] | None = None, k: int = 50,
                max_queries: int = 2000, seed: int = 0, log=print) -> tuple[np.ndarray, Evidence, dict[str, np.ndarray]]:
    """Every signal for photos it has not seen: each fold is queried against a scratch bundle of the others.

    The cells' priors and Class2GPS means, the gallery's points and density
    prior, and the kNN index all contain the gallery photos themselves, so
    scoring a gallery photo against the real bundle would find its own
    answer. Returns (queried rows, their evidence, single-mode answers [n, 2]).
    At most ``max_queries`` rows are queried per fold (a seeded sample).
    """
    import tempfile

    from geo.index_build.runner import build_from_embeddings
    from geo.retrieval.index import GeoIndex
    from geo.retrieval.knn import kde_vote

    rng = np.random.default_rng(seed)
    all_rows, parts, singles = [], [], {"knn": [], "gallery": [], "cells": [], "prior": []}
    for f in np.unique(folds):
        held = np.flatnonzero(folds == f)
        if len(held) > max_queries:
            held = np.sort(rng.choice(held, max_queries, replace=False))
        train = folds != f
        log(f"fusion: fold {f + 1}/{len(np.unique(folds))}, {int(train.sum())} photos fit, {len(held)} scored")
        with tempfile.TemporaryDirectory(prefix="geo-fusion-") as tmp:
            # the scratch build's own logs would repeat the real build's, so it runs quietly
            index = GeoIndex(build_from_embeddings(tmp, backbone, meta[train], emb[train], has_cells, has_gallery,
                                                   stage_options))
            ev = index.evidence(emb[held], k=k)
            finite = np.isfinite(ev.knn_sim)
            singles["knn"].append(np.array([[v.lat, v.lon] for v in (
                kde_vote(ev.knn_latlon[i, finite[i], 0], ev.knn_latlon[i, finite[i], 1], ev.knn_sim[i, finite[i]],
                         index.knn_params) for i in range(len(ev)))]))
            if has_gallery:
                singles["gallery"].append(ev.gallery_latlon[:, 0])
            if has_cells:
                singles["cells"].append(np.stack(index.cells.decide(index.cell_probs(emb[held]))[:2], -1))
                singles["prior"].append(np.broadcast_to(population_prior(index.lat, index.lon), (len(held), 2)))
        all_rows.append(held)
        parts.append(ev)
    return np.concatenate(all_rows), Evidence.concat(parts), {m: np.concatenate(v) for m, v in singles.items() if v}


def tune_fusion_stage(bundle, group: str | None = None, folds: int = 3, seed: int = 0, k: int = 50,
                      max_queries: int = 2000, stage_options: dict[str, Any] | None = None, log=print) -> dict[str, Any]:
    """Fit fusion on out-of-fold evidence for the gallery's own photos; store params, scores and calibration.

    Folds hold out whole photographers (the group column), so the weights are
    fitted to how the signals do on people the index has not seen.
    """
    from geo.bundle import atomic_write_json
    from geo.splits import group_column, group_folds

    meta, emb = bundle.read_embeddings()
    col = group_column(meta.columns, group)
    groups = meta[col].astype(str).to_numpy() if col else None
    n_groups = len(np.unique(groups)) if groups is not None else len(meta)
    has_cells, has_gallery = bundle.has_stage("cells"), bundle.has_stage("gallery")
    if len(meta) < 20 or n_groups < folds:
        log(f"fusion: {len(meta)} photos in {n_groups} groups are too few to tune; default weights, no calibration")
        params, report = FusionParams(), {"validation": None}
    else:
        fold = group_folds(len(meta), groups, folds, seed)
        rows, ev, singles = out_of_fold(meta, emb, fold, bundle.manifest["backbone"], has_cells, has_gallery,
                                        stage_options, k, max_queries, seed, log)
        truth = meta[["lat", "lon"]].to_numpy(np.float64)[rows]
        params, report = tune(ev, truth, has_cells, has_gallery, groups[rows] if groups is not None else None, log=log)
        report["single_modes"] = {m: accuracy(p, truth) for m, p in singles.items()}
        report["n_validation"] = int(len(rows))
        for m, a in {**report["single_modes"], "fused": report["validation"]}.items():
            log(f"fusion out-of-fold {m:>8}: " + " ".join(f"{t}km {100 * a[t]:.1f}%" for t in ("1", "25", "200", "750", "2500"))
                + f"  median {a['median_km']:.0f} km")
    info = {"params": params.to_dict(), "group_column": col, "folds": folds, "seed": seed, **report}
    atomic_write_json(bundle.path(FUSION_FILE), info)
    bundle.register("fusion", [FUSION_FILE], {"params": params.to_dict(), "validation": report.get("validation"),
                                              "single_modes": report.get("single_modes"), "ece": report.get("ece")},
                    replace_prefix="fusion/")
    return info
