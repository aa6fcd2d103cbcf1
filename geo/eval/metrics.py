"""Geolocation metrics: accuracy at the five standard radii, median/mean error, GeoScore, bootstrap CIs.

Conventions follow GeoEstimation (Müller-Budack et al., ECCV 2018), whose
published result files this module reproduces to the printed digit:
haversine on R = 6371.0 km and ``distance <= threshold``. ``geodesic``
(WGS84, Karney's algorithm via geographiclib) is offered because GeoCLIP and
G3 report geodesic distances; the two differ by up to ~0.5 %.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from geo.core.geodesy import THRESHOLDS_KM, haversine_km

THRESHOLD_NAMES = {1: "street", 25: "city", 200: "region", 750: "country", 2500: "continent"}
DISTANCES = ("haversine", "geodesic")
GEOSCORE_SCALE_KM = 1492.7  # OSV-5M: 5000 * exp(-d / 1492.7)


def distances_km(true_lat, true_lon, pred_lat, pred_lon, distance: str = "haversine") -> np.ndarray:
    """Per-row error in km between truth and prediction."""
    if distance == "haversine":
        return haversine_km(true_lat, true_lon, pred_lat, pred_lon)
    if distance == "geodesic":
        from geographiclib.geodesic import Geodesic

        inv = Geodesic.WGS84.Inverse
        rows = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (true_lat, true_lon, pred_lat, pred_lon)))
        # geographiclib is scalar-only; ~30 µs per pair keeps even YFCC26k under a second.
        out = [inv(a, b, c, d, Geodesic.DISTANCE)["s12"] / 1000.0 for a, b, c, d in zip(*(r.ravel() for r in rows))]
        return np.asarray(out, dtype=np.float64).reshape(rows[0].shape)
    raise ValueError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")


def geoscore(d_km) -> np.ndarray:
    """OSV-5M's GeoScore per photo (5000 at 0 km, ~1800 at 1,500 km)."""
    return 5000.0 * np.exp(-np.asarray(d_km, dtype=np.float64) / GEOSCORE_SCALE_KM)


def _stats(d: np.ndarray, thresholds: Sequence[int]) -> dict[str, Any]:
    """Point estimates over the last axis (works for one sample [n] or bootstrap draws [B, n])."""
    return {
        "acc": {str(t): (d <= t).mean(axis=-1) for t in thresholds},
        "median_km": np.median(d, axis=-1),
        "mean_km": d.mean(axis=-1),
        "geoscore": geoscore(d).mean(axis=-1),
    }


def bootstrap_ci(d_km, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                 thresholds: Sequence[int] = THRESHOLDS_KM, chunk: int = 100) -> dict[str, Any]:
    """Percentile bootstrap intervals, seeded so a re-run prints the same interval.

    Draws are made ``chunk`` at a time so YFCC26k x 1000 draws does not hold a
    200 MB index matrix.
    """
    d = np.asarray(d_km, dtype=np.float64)
    if d.size == 0:
        return {}
    rng = np.random.default_rng(seed)
    draws: list[dict[str, Any]] = []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        draws.append(_stats(d[rng.integers(0, d.size, size=(b, d.size))], thresholds))
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2

    def interval(values: list[np.ndarray]) -> list[float]:
        v = np.concatenate(values)
        return [float(np.percentile(v, lo)), float(np.percentile(v, hi))]

    return {
        "level": level,
        "n_boot": n_boot,
        "seed": seed,
        "acc": {str(t): interval([x["acc"][str(t)] for x in draws]) for t in thresholds},
        "median_km": interval([x["median_km"] for x in draws]),
        "mean_km": interval([x["mean_km"] for x in draws]),
        "geoscore": interval([x["geoscore"] for x in draws]),
    }


def summarize(d_km, *, n_missing: int = 0, n_failed: int = 0, ci: bool = True, n_boot: int = 1000,
              seed: int = 0, thresholds: Sequence[int] = THRESHOLDS_KM) -> dict[str, Any]:
    """The metrics of one run.

    ``n`` and the headline numbers count only photos that were located, as
    the published tables do. Photos that were missing or unreadable are never
    dropped silently: they are counted, and ``acc_over_total`` scores them as
    misses so the penalty of an incomplete download is visible.
    """
    d = np.asarray(d_km, dtype=np.float64)
    n = int(d.size)
    n_total = n + n_missing + n_failed
    nan = float("nan")
    point = _stats(d, thresholds) if n else None
    out: dict[str, Any] = {
        "n": n,
        "n_total": n_total,
        "n_missing": int(n_missing),
        "n_failed": int(n_failed),
        "acc": {str(t): float(point["acc"][str(t)]) if n else nan for t in thresholds},
        "median_km": float(point["median_km"]) if n else nan,
        "mean_km": float(point["mean_km"]) if n else nan,
        "geoscore": float(point["geoscore"]) if n else nan,
        "acc_over_total": {str(t): float((d <= t).sum() / n_total) if n_total else nan for t in thresholds},
    }
    if ci and n:
        out["ci"] = bootstrap_ci(d, n_boot=n_boot, seed=seed, thresholds=thresholds)
    return out


def breakdown(d_km, labels, **kwargs) -> dict[str, dict[str, Any]]:
    """:func:`summarize` per label (scene, country, continent); null labels are grouped as "unknown"."""
    d = np.asarray(d_km, dtype=np.float64)
    labels = np.asarray([("unknown" if (x is None or (isinstance(x, float) and math.isnan(x))) else str(x))
                         for x in labels], dtype=object)
    return {str(g): summarize(d[labels == g], **kwargs) for g in sorted(set(labels.tolist()))}


def geoestimation_footer(summary: Mapping[str, Any]) -> str:
    """The two footer lines of a GeoEstimation result file, formatted as they print them.

    Their script rounds accuracies to 6 and the mean to 2 decimals and lets
    Python print the shortest repr (``3211.1``, ``0.43038``).
    """
    names = [f"{THRESHOLD_NAMES[t]} acc ({t}km)" for t in THRESHOLDS_KM] + ["mean deviation (km)"]
    values = [str(round(summary["acc"][str(t)], 6)) for t in THRESHOLDS_KM] + [str(round(summary["mean_km"], 2))]
    return ",".join(names) + "\n" + ",".join(values)


def label_accuracy(true_label, pred_label) -> dict[str, Any]:
    """Share of located photos whose answer got the truth's label: the country (both sides from the same
    shapes, :mod:`geo.data.countries`) or the city (:func:`geo.data.places.cities_of`). Photos whose truth
    has no label (at sea; farther than 25 km from any town) are left out of ``n``."""
    t = np.asarray(true_label, dtype=object)
    p = np.asarray(pred_label, dtype=object)
    known = np.array([isinstance(x, str) for x in t], bool)
    n = int(known.sum())
    return {"acc": float(np.mean(t[known] == p[known])) if n else float("nan"), "n": n}


def label_accuracies(preds) -> dict[str, dict[str, Any]]:
    """:func:`label_accuracy` of a predictions frame's country and city columns, as a summary's two keys."""
    return {what: label_accuracy(preds[f"true_{what}"], preds[f"pred_{what}"]) for what in ("country", "city")}
