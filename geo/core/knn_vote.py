"""Answer from image neighbours by a kernel-density vote in kilometres.

Vo, Jacobs & Hays, "Revisiting IM2GPS in the Deep Learning Era" (ICCV 2017):
weight each retrieved neighbour by its similarity, estimate the density of
weighted neighbours around each of them with a Gaussian kernel in km, and
answer with the neighbour at the densest place. Snapping to a real neighbour
(instead of a mean) keeps the answer on land and on a real photo's spot, and
a near-duplicate in the gallery wins outright because its weight dominates.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from geo.core.geodesy import haversine_km, pairwise_haversine_km


@dataclass(frozen=True)
class KnnParams:
    bandwidth_km: float = 25.0      # kernel width: photos of one town support each other
    temperature: float = 0.05       # similarity -> weight: softmax(sim / T)
    radius_km: float = 25.0         # confidence = neighbour weight within this radius of the answer


@dataclass
class KnnVote:
    lat: float
    lon: float
    confidence: float
    best: int                       # index (into the neighbour list) the answer snapped to
    weights: np.ndarray             # [k], sum 1
    density: np.ndarray             # [k], kernel density at each neighbour
    distance_km: np.ndarray         # [k], each neighbour's distance to the answer


def neighbour_weights(sim: np.ndarray, temperature: float) -> np.ndarray:
    z = (sim - sim.max()) / temperature
    w = np.exp(z)
    return w / w.sum()


def kde_vote(lat: np.ndarray, lon: np.ndarray, sim: np.ndarray, params: KnnParams = KnnParams()) -> KnnVote:
    """Vote over one query's neighbours (arrays of length k, any order)."""
    w = neighbour_weights(np.asarray(sim, np.float64), params.temperature)
    d = pairwise_haversine_km(lat, lon, lat, lon)
    density = (np.exp(-0.5 * (d / params.bandwidth_km) ** 2) * w[None, :]).sum(axis=1)
    best = int(np.argmax(density))
    dist = haversine_km(lat, lon, lat[best], lon[best])
    conf = float(w[dist <= params.radius_km].sum())
    return KnnVote(float(lat[best]), float(lon[best]), conf, best, w, density, dist)
