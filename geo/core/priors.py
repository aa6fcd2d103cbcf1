"""Where the gallery's photos are: counts within a radius, the best constant guess, the prior as a few points.

These are the answers an index gives with no image evidence at all, and the
yardstick every mode must beat: the constant guess (the gallery photo with
most gallery photos within 750 km) is exactly what a posterior equal to the
gallery's photo distribution answers for the 750 km threshold.
"""
from __future__ import annotations

import numpy as np

from geo.core import s2
from geo.core.geodesy import EARTH_RADIUS_KM, cos_km, latlon_to_xyz, xyz_to_latlon

# Up to this many point-photo pairs, counts are exact dot products of unit vectors in blocks (no index to build,
# and scikit-learn stays unimported on the query side); beyond, a ball tree.
DENSE_PAIRS = 50_000_000
# The radii of the best constant guesses that follow the prior's weighted points (:func:`prior_summary`), in order.
ANCHOR_KMS = (750.0, 2500.0)


def photos_within(points: np.ndarray, photos: np.ndarray, radius_km: float, max_photos: int = 50_000,
                  seed: int = 0) -> np.ndarray:
    """float64 [m]: how many of ``photos`` ([n, 2] degrees) lie within ``radius_km`` of each of ``points`` ([m, 2]).

    Small problems compare unit vectors (``d <= r`` is ``cos(d / R) >= cos(r / R)``)
    in blocks; large ones use a ball tree over haversine distances, O((n + m) log n)
    where a distance matrix would be O(n m). Above ``max_photos`` photos a seeded
    sample is counted and the counts are scaled back up.
    """
    photos = np.asarray(photos, np.float64).reshape(-1, 2)
    points = np.asarray(points, np.float64).reshape(-1, 2)
    scale = 1.0
    if len(photos) > max_photos:
        scale = len(photos) / max_photos
        photos = photos[np.random.default_rng(seed).choice(len(photos), max_photos, replace=False)]
    if len(photos) == 0 or len(points) == 0:
        return np.zeros(len(points))
    if len(points) * len(photos) <= DENSE_PAIRS:
        a, b, c = latlon_to_xyz(points[:, 0], points[:, 1]), latlon_to_xyz(photos[:, 0], photos[:, 1]), cos_km(radius_km)
        step = max(1, DENSE_PAIRS // (20 * len(photos)))
        counts = np.concatenate([(a[i:i + step] @ b.T >= c).sum(axis=1) for i in range(0, len(a), step)])
        return counts.astype(np.float64) * scale
    from sklearn.neighbors import BallTree  # heavy to import; only big galleries' builds get here

    tree = BallTree(np.radians(photos), metric="haversine")
    counts = tree.query_radius(np.radians(points), r=radius_km / EARTH_RADIUS_KM, count_only=True)
    return counts.astype(np.float64) * scale


def population_prior(lat: np.ndarray, lon: np.ndarray, radius_km: float = 750.0, max_photos: int = 2000) -> np.ndarray:
    """The best constant guess [lat, lon]: the gallery photo with the most gallery photos within ``radius_km``.

    Exact up to ``max_photos`` photos; a seeded sample of them beyond (the answer moves little).
    """
    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    ok = np.flatnonzero(np.isfinite(lat) & np.isfinite(lon))
    if len(ok) > max_photos:
        ok = np.sort(np.random.default_rng(0).choice(ok, max_photos, replace=False))
    pts = np.stack([lat[ok], lon[ok]], -1)
    i = ok[int(np.argmax(photos_within(pts, pts, radius_km, max_photos=len(pts) + 1)))]
    return np.array([lat[i], lon[i]])


def prior_summary(lat: np.ndarray, lon: np.ndarray, max_points: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The gallery's photo distribution as at most ``max_points`` weighted points (the population prior),
    followed by the best constant guesses at 750 and 2500 km as weightless candidates.

    Photos are grouped by S2 cell at the finest level that leaves no more than
    ``max_points`` occupied cells; each group is its spherical mean with its
    share of the photos. Small enough to score against every candidate per query.
    """
    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
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
    anchors = np.stack([population_prior(lat, lon, r) for r in ANCHOR_KMS])
    return (np.concatenate([np.stack([plat, plon], -1), anchors]),
            np.concatenate([counts / counts.sum(), np.zeros(len(ANCHOR_KMS))]))
