"""Distances and projections on the sphere, vectorised over numpy arrays.

One definition of distance for the whole engine: haversine on a sphere of
R = 6371.0 km, the convention of GeoEstimation's published results (their
footers are reproduced exactly with it). Geodesic WGS84 distances live in
``geo.eval.metrics`` for comparability with papers that use them.
"""
from __future__ import annotations

import numpy as np

EARTH_RADIUS_KM = 6371.0
# The field's accuracy thresholds (street, city, region, country, continent), used by
# evaluation, fusion's decision and tuning, and the gallery's validation.
THRESHOLDS_KM: tuple[int, ...] = (1, 25, 200, 750, 2500)


def haversine_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance in km between broadcastable arrays of degrees."""
    lat1, lon1, lat2, lon2 = (np.radians(np.asarray(a, dtype=np.float64)) for a in (lat1, lon1, lat2, lon2))
    a = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def pairwise_haversine_km(lat_a, lon_a, lat_b, lon_b) -> np.ndarray:
    """Distance matrix [len(a), len(b)] in km."""
    return haversine_km(
        np.asarray(lat_a)[:, None], np.asarray(lon_a)[:, None], np.asarray(lat_b)[None, :], np.asarray(lon_b)[None, :]
    )


def latlon_to_xyz(lat, lon) -> np.ndarray:
    """Unit vectors [..., 3]; the representation in which means are safe across the antimeridian."""
    lat, lon = np.radians(np.asarray(lat, dtype=np.float64)), np.radians(np.asarray(lon, dtype=np.float64))
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=-1)


def unit_vectors(v: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (a mean of directions back onto the sphere); zero rows stay zero."""
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def xyz_to_latlon(xyz) -> tuple[np.ndarray, np.ndarray]:
    xyz = np.asarray(xyz, dtype=np.float64)
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    lat = np.degrees(np.arctan2(z, np.hypot(x, y)))
    lon = np.degrees(np.arctan2(y, x))
    return lat, lon


# Equal Earth projection (Šavrič, Patterson & Jenny 2018), as GeoCLIP uses it.
_A1, _A2, _A3, _A4 = 1.340264, -0.081106, 0.000893, 0.003796
_SF = 66.50336


def equal_earth(lat, lon) -> np.ndarray:
    """Equal Earth x, y scaled as GeoCLIP does (x in about [-1.6, 1.6], y in about [-0.8, 0.8])."""
    lat = np.radians(np.asarray(lat, dtype=np.float64))
    lon = np.radians(np.asarray(lon, dtype=np.float64))
    theta = np.arcsin(np.sqrt(3.0) / 2 * np.sin(lat))
    den = 3 * (9 * _A4 * theta**8 + 7 * _A3 * theta**6 + 3 * _A2 * theta**2 + _A1)
    x = 2 * np.sqrt(3.0) * lon * np.cos(theta) / den
    y = _A4 * theta**9 + _A3 * theta**7 + _A2 * theta**3 + _A1 * theta
    return np.stack([x, y], axis=-1) * _SF / 180.0


def thresholds_met(km: np.ndarray) -> np.ndarray:
    """The share of the field's thresholds (:data:`THRESHOLDS_KM`) each error in ``km`` is within: the mean of the
    five accuracies, per answer (NaN meets none). Fusion's tuning, its reranker and the regression's shrinkage
    all maximise it."""
    return np.mean([km <= t for t in THRESHOLDS_KM], axis=0)


def cos_km(km: float) -> float:
    """cos of the central angle of ``km``: ``d <= km`` is ``dot(unit_a, unit_b) >= cos_km(km)``."""
    return float(np.cos(min(km / EARTH_RADIUS_KM, np.pi)))


def valid_latlon(lat, lon) -> np.ndarray:
    """Boolean mask of finite coordinates inside [-90, 90] x [-180, 180]."""
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    return np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90) & (np.abs(lon) <= 180)
