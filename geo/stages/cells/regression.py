"""Coordinate regression over the embeddings, fitted in the cells stage (``--mode regression``).

Why: the seed papers pair cell classification with a regression of the coordinates (Manocchio & Passaro);
it answers anywhere, not only at a cell's photos, and costs one matrix product. Ridge regression onto the
unit vector (x, y, z) of each photo, normalised back onto the sphere, so an answer always lies on it (a
mean of directions near the poles or across the antimeridian stays a valid place, which a regression of
raw degrees does not). The ridge strength is chosen on the held-out photographers, and their hit rates
within 25 / 200 / 750 km are the mode's stated confidence: honest, if the same for every photo.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from geo.core.geodesy import THRESHOLDS_KM, haversine_km, latlon_to_xyz, xyz_to_latlon
from geo.stages.fusion.calibration import CALIBRATED_KM
from geo.store.atomic import atomic_save_safetensors
from geo.store.bundle import Bundle, BundleError

REGRESSION_WEIGHTS = "heads/regression.safetensors"
ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # times the number of training photos


@dataclass
class Regression:
    weight: np.ndarray  # [dim, 3]
    bias: np.ndarray  # [3]
    info: dict[str, Any]

    def predict(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lat, lon) for embeddings [n, dim] or [n, crops, dim] (crops averaged before the product)."""
        e = emb.mean(axis=1) if emb.ndim == 3 else emb
        xyz = e.astype(np.float64) @ self.weight + self.bias
        xyz /= np.linalg.norm(xyz, axis=1, keepdims=True).clip(min=1e-12)
        return xyz_to_latlon(xyz)

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


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    mx, my = x.mean(axis=0), y.mean(axis=0)
    xc = x - mx
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - my))
    return w, my - mx @ w


def fit_regression(emb: np.ndarray, lat: np.ndarray, lon: np.ndarray, val: np.ndarray) -> Regression:
    """Ridge onto unit vectors from the training photos (``val`` marks the held-out ones: indices or a mask);
    the strength with the best held-out median error is kept and refitted on every photo."""
    held = np.zeros(len(emb), bool)
    held[val] = True
    x, y = emb.astype(np.float64), latlon_to_xyz(lat, lon)
    if held.all() or not held.any():
        held = np.zeros(len(emb), bool)  # no held-out photographers: fit on all, state no accuracy
    best = None
    for a in ALPHAS:
        alpha = a * max(int((~held).sum()), 1)
        w, b = _ridge(x[~held], y[~held], alpha)
        if not held.any():
            best = (alpha, w, b, None)
            break
        reg = Regression(w, b, {})
        err = haversine_km(*reg.predict(x[held]), lat[held], lon[held])
        if best is None or np.median(err) < best[3][0]:
            best = (alpha, w, b, (float(np.median(err)), err))
    alpha, _, _, scored = best
    w, b = _ridge(x, y, alpha)
    info: dict[str, Any] = {"alpha": alpha, "photos": int(len(x)), "held_out": int(held.sum())}
    if scored is not None:
        median, err = scored
        info["held_out_median_km"] = round(median, 1)
        info["held_out_acc"] = {str(t): round(float(np.mean(err <= t)), 4) for t in THRESHOLDS_KM}
        info["p_within"] = {t: info["held_out_acc"][t] for t in CALIBRATED_KM}
    return Regression(w, b, info)
