"""Calibration of fusion's ``p_within``: posterior mass within a radius -> the observed frequency of being within it.

The raw mixture is not a probability anyone measured: temperatures and weights
are tuned for accuracy, not for calibration. Isotonic regression on the same
out-of-fold evidence maps the mass to how often answers with that mass were
right, and the expected calibration error says how far the raw mass was off.
"""
from __future__ import annotations

import numpy as np

CALIBRATED_KM = ("25", "200", "750")


def fit_isotonic(x: np.ndarray, hit: np.ndarray) -> dict[str, list[float]]:
    """Monotone map posterior mass -> observed frequency, stored as breakpoints for np.interp."""
    from sklearn.isotonic import IsotonicRegression  # build time only; the query side needs np.interp alone

    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(x, hit.astype(float))
    return {"x": [float(v) for v in iso.X_thresholds_], "y": [float(v) for v in iso.y_thresholds_]}


def calibrated(mass: dict[str, float], calibration: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    out = {}
    for t in CALIBRATED_KM:
        c = calibration.get(t)
        out[t] = round(float(np.interp(mass[t], c["x"], c["y"])) if c and c["x"] else mass[t], 4)
    return out


def _bins(prob: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    edges = np.linspace(0, 1, bins + 1)
    return edges, np.clip(np.digitize(prob, edges) - 1, 0, bins - 1)


def expected_calibration_error(prob: np.ndarray, hit: np.ndarray, bins: int = 10) -> float:
    _, idx = _bins(prob, bins)
    return float(sum((idx == b).mean() * abs(prob[idx == b].mean() - hit[idx == b].mean())
                     for b in range(bins) if (idx == b).any()))


def reliability_table(prob: np.ndarray, hit: np.ndarray, bins: int = 5) -> list[dict[str, float]]:
    edges, idx = _bins(prob, bins)
    return [{"bin": f"{edges[b]:.1f}-{edges[b + 1]:.1f}", "n": int((idx == b).sum()),
             "predicted": round(float(prob[idx == b].mean()), 3), "observed": round(float(hit[idx == b].mean()), 3)}
            for b in range(bins) if (idx == b).any()]
