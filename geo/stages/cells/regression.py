"""Coordinate regression over the embeddings, fitted in the cells stage (``--mode regression``).

Why: the seed papers pair cell classification with a regression of the coordinates (Manocchio & Passaro);
it answers anywhere, not only at a cell's photos, and costs one matrix product. Ridge regression onto the
unit vector (x, y, z) of each photo, normalised back onto the sphere, so an answer always lies on it (a
mean of directions near the poles or across the antimeridian stays a valid place, which a regression of
raw degrees does not).

Like every other mode, it backs off to the constant guess where its signal does not transfer: the answer is
``w * regression + (1 - w) * prior`` on the sphere, the prior being the gallery's population prior. The
ridge strength and ``w`` come from out-of-fold answers for every photo (:data:`FOLDS` photographer folds:
the ridge is closed-form, so this costs little); ``w`` is the best mean hit rate over the benchmark
thresholds, kept only if it beats the prior alone (``w`` = 0) by more than one standard error of the
per-photographer difference, as fusion backs off. One held-out split of a small gallery is a few
photographers: on the Im2GPS3k dev folds it let w through where it lost 13 points at 2500 km. The
out-of-fold hit rates within 25 / 200 / 750 km are the mode's stated confidence, the same for every photo.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from geo.core.geodesy import THRESHOLDS_KM, haversine_km, latlon_to_xyz, thresholds_met, unit_vectors, xyz_to_latlon
from geo.core.priors import population_prior
from geo.core.splits import group_folds
from geo.stages.fusion.calibration import CALIBRATED_KM
from geo.store.atomic import atomic_save_safetensors
from geo.store.bundle import Bundle, BundleError

REGRESSION_WEIGHTS = "heads/regression.safetensors"
ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # times the number of training photos
SHRINK = np.linspace(0.0, 1.0, 11)  # the regression's weight against the prior, tried out of fold
FOLDS = 3


@dataclass
class Regression:
    weight: np.ndarray  # [dim, 3]
    bias: np.ndarray  # [3]
    info: dict[str, Any]

    def predict(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lat, lon) for embeddings [n, dim] or [n, crops, dim] (crops averaged before the product), shrunk
        towards the prior by the held-out weight (``info["shrink"]``; bundles from before it: none)."""
        e = emb.mean(axis=1) if emb.ndim == 3 else emb
        shrink = self.info.get("shrink")
        prior = None if shrink is None else latlon_to_xyz(*np.asarray(shrink["prior"], np.float64))
        return xyz_to_latlon(_blend(e.astype(np.float64) @ self.weight + self.bias, prior,
                                    1.0 if shrink is None else float(shrink["weight"])))

    def save(self, bundle: Bundle) -> str:
        atomic_save_safetensors(bundle.path(REGRESSION_WEIGHTS), {"weight": torch.from_numpy(self.weight),
                                                                   "bias": torch.from_numpy(self.bias)})
        return REGRESSION_WEIGHTS

    @classmethod
    def load(cls, bundle: Bundle, info: dict[str, Any]) -> "Regression":
        path = bundle.path(REGRESSION_WEIGHTS)
        try:
            t = load_file(str(path))
            return cls(t["weight"].numpy().astype(np.float64), t["bias"].numpy().astype(np.float64), info)
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise BundleError(f"{path}: cannot read the regression head ({type(e).__name__}: {e})") from None


def _blend(raw: np.ndarray, prior_xyz: np.ndarray | None, weight: float) -> np.ndarray:
    """Unit vectors: the regression's direction, moved towards the prior's by 1 - weight."""
    out = unit_vectors(raw)
    if prior_xyz is not None and weight < 1.0:
        out = unit_vectors(weight * out + (1.0 - weight) * prior_xyz)
    return out


CHUNK = 8192  # rows per float64 block: the statistics pass holds [CHUNK, dim], never a float64 copy of the gallery


@dataclass
class _Moments:
    """Sums over a set of photos from which a centred ridge is solved without the photos themselves:
    n, sum x, sum x x^T, sum y, sum x y^T (float64; dim x dim is 13 MB at 1280-d)."""

    n: float
    sx: np.ndarray
    sxx: np.ndarray
    sy: np.ndarray
    sxy: np.ndarray

    def __add__(self, other: "_Moments") -> "_Moments":
        return _Moments(self.n + other.n, self.sx + other.sx, self.sxx + other.sxx, self.sy + other.sy,
                        self.sxy + other.sxy)

    def __sub__(self, other: "_Moments") -> "_Moments":
        return _Moments(self.n - other.n, self.sx - other.sx, self.sxx - other.sxx, self.sy - other.sy,
                        self.sxy - other.sxy)

    def ridge(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """(weight [dim, 3], bias [3]) of the ridge on centred data: (Xc'Xc + alpha I) w = Xc'Yc."""
        mx, my = self.sx / self.n, self.sy / self.n
        xx = self.sxx - self.n * np.outer(mx, mx)
        xy = self.sxy - self.n * np.outer(mx, my)
        w = np.linalg.solve(xx + alpha * np.eye(len(mx)), xy)
        return w, my - mx @ w


def _moments(emb: np.ndarray, y: np.ndarray, fold: np.ndarray, folds: int) -> list[_Moments]:
    """Each fold's moments, in one pass over the embeddings a float64 block at a time: the 15 out-of-fold
    ridges (folds x alphas) then cost solves of [dim, dim], not passes over a float64 copy of the gallery."""
    d = emb.shape[1]
    out = [_Moments(0.0, np.zeros(d), np.zeros((d, d)), np.zeros(3), np.zeros((d, 3))) for _ in range(folds)]
    for s in range(0, len(emb), CHUNK):
        x, yc, fc = emb[s:s + CHUNK].astype(np.float64), y[s:s + CHUNK], fold[s:s + CHUNK]
        for f, m in enumerate(out):
            sel = fc == f
            if sel.any():
                xf, yf = x[sel], yc[sel]
                m.n += float(sel.sum())
                m.sx += xf.sum(axis=0)
                m.sxx += xf.T @ xf
                m.sy += yf.sum(axis=0)
                m.sxy += xf.T @ yf
    return out


def _predict(emb: np.ndarray, rows: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Raw predictions for ``rows`` of ``emb``, a float64 block at a time."""
    return np.concatenate([emb[rows[s:s + CHUNK]].astype(np.float64) @ w + b for s in range(0, len(rows), CHUNK)]
                          or [np.zeros((0, 3))])


def _ridge(emb: np.ndarray, y: np.ndarray, rows: np.ndarray, moments: _Moments,
           alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(weight [dim, 3], bias [3]) of the centred ridge on ``rows`` (whose sums are ``moments``).

    Fewer photos than dimensions (a small gallery of 1280-d features): solved in the photos' space,
    w = Xc' (Xc Xc' + alpha I)^-1 Yc, the same weights by the push-through identity. The [dim, dim] system
    cost 0.1 s a solve at 1280-d, 1.7 s of a 51-photo build's 16 solves; an [m, m] one costs microseconds.
    """
    if len(rows) >= emb.shape[1]:
        return moments.ridge(alpha)
    x, yr = emb[rows].astype(np.float64), y[rows]
    mx, my = x.mean(axis=0), yr.mean(axis=0)
    xc = x - mx
    w = xc.T @ np.linalg.solve(xc @ xc.T + alpha * np.eye(len(rows)), yr - my)
    return w, my - mx @ w


def _splits(moments: list[_Moments], fold: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, _Moments]]:
    """(its rows, the other folds' rows, their moments) of each fold with photos on both sides: made once for
    every ridge strength tried (each other-folds sum is [dim, dim])."""
    total = _total(moments)
    return [(np.flatnonzero(fold == f), np.flatnonzero(fold != f), total - m) for f, m in enumerate(moments)
            if m.n > 0 and total.n - m.n > 0]


def _out_of_fold(emb: np.ndarray, y: np.ndarray, splits: list[tuple[np.ndarray, np.ndarray, _Moments]],
                 alpha_per_photo: float) -> np.ndarray:
    """Raw (unnormalised) predictions for every photo from ridges fitted without its fold."""
    raw = np.zeros((len(emb), 3))
    for held, rows, rest in splits:
        raw[held] = _predict(emb, held, *_ridge(emb, y, rows, rest, alpha_per_photo * rest.n))
    return raw


def _total(moments: list[_Moments]) -> _Moments:
    return functools.reduce(operator.add, moments)


def fit_regression(emb: np.ndarray, lat: np.ndarray, lon: np.ndarray, groups: np.ndarray | None = None,
                   seed: int = 0) -> Regression:
    """Ridge onto unit vectors, its strength and its weight against the prior chosen out of fold over whole
    ``groups`` (photographers; rows at random without them), then refitted on every photo."""
    import pandas as pd

    y, n = latlon_to_xyz(lat, lon), len(emb)
    info: dict[str, Any] = {"photos": int(n)}
    n_groups = len(np.unique(np.asarray(groups).astype(str))) if groups is not None else n
    if n_groups < FOLDS or n < 2 * FOLDS:  # too few photographers to score out of fold: no claims, no say
        info.update({"alpha": ALPHAS[0] * n, "shrink": {"weight": 1.0, "prior": [float(v) for v in
                                                                               population_prior(lat, lon)]}})
        w, b = _ridge(emb, y, np.arange(n), _moments(emb, y, np.zeros(n, np.int64), 1)[0], info["alpha"])
        return Regression(w, b, info)
    fold = group_folds(n, groups, FOLDS, seed)
    moments = _moments(emb, y, fold, FOLDS)
    splits = _splits(moments, fold)
    tried = []
    for a in ALPHAS:
        raw = _out_of_fold(emb, y, splits, a)
        tried.append((float(np.median(haversine_km(*xyz_to_latlon(raw), lat, lon))), a, raw))
    _, a, raw = min(tried, key=lambda t: t[0])
    # each photo's prior is its training folds' (the answer a bundle without that photo would give)
    prior_xyz = np.zeros_like(y)
    for f in np.unique(fold):
        prior_xyz[fold == f] = latlon_to_xyz(*population_prior(lat[fold != f], lon[fold != f]))
    hits = {}
    for s in SHRINK:
        err = haversine_km(*xyz_to_latlon(_blend(raw, prior_xyz, s)), lat, lon)
        hits[s] = (thresholds_met(err), err)
    best = max(SHRINK, key=lambda s: (hits[s][0].mean(), -s))
    diff = hits[best][0] - hits[0.0][0]
    by_group = pd.Series(diff).groupby(np.asarray(groups).astype(str) if groups is not None else np.arange(n)).sum()
    se = by_group.std(ddof=1) * np.sqrt(len(by_group)) / n if len(by_group) > 1 else np.inf
    weight = float(best) if diff.mean() > se else 0.0
    err = hits[weight][1]
    info.update({
        "alpha": a * n,
        "shrink": {"weight": weight, "prior": [float(v) for v in population_prior(lat, lon)],
                   "held_out_score": round(float(hits[weight][0].mean()), 4),
                   "unshrunk_score": round(float(hits[1.0][0].mean()), 4),
                   "prior_score": round(float(hits[0.0][0].mean()), 4)},
        "held_out": int(n), "held_out_median_km": round(float(np.median(err)), 1),
        "held_out_acc": {str(t): round(float(np.mean(err <= t)), 4) for t in THRESHOLDS_KM},
    })
    info["p_within"] = {t: info["held_out_acc"][t] for t in CALIBRATED_KM}
    w, b = _ridge(emb, y, np.arange(n), _total(moments), info["alpha"])
    return Regression(w, b, info)
