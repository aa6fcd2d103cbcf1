"""Semantic geocells (PIGEON, Haas et al. 2024): cells that follow country borders and where photos cluster.

S2 cells cut the world along a fixed grid, so one cell can hold half of
Geneva and a slice of France, and a class boundary runs through a city. A
semantic partition instead

1. splits the photos by country (Natural Earth shapes, :mod:`geo.data.countries`);
   a photo just off the coast of the 1:50m shapes (:data:`COAST_KM`) counts for
   the country of its nearest photo on land, so harbours and beaches stay with their country;
2. inside each country holding more than ``tau_max`` photos, finds where they
   cluster by density (haversine; on a seeded sample of at most
   :data:`CLUSTER_SAMPLE` photos per split, so a country of millions costs the
   same), takes each cluster's spherical mean as a *seed*, and splits any
   seed's share that still holds more than ``tau_max`` again (k-means when
   the density finds no structure; neighbouring clusters merged when there are more than twice the
   ``n / tau_max`` cells a share needs, so cells stay near ``tau_max`` like S2 cells). PIGEON used OPTICS; scikit-learn's HDBSCAN
   is the same family (a hierarchy of density levels, no fixed radius) and
   finds nearly the same clusters 15x faster (2,000 YFCC photos in North
   America: OPTICS 2.89 s, 118 clusters; HDBSCAN 0.20 s, 105), which decides
   whether a million-photo country partitions in seconds or in an hour;
3. gives every point the nearest seed of its own country: the cells are the
   seeds' Voronoi regions clipped to the borders. A point in a country without
   seeds (or at sea) takes the nearest seed anywhere, so the cells cover the
   globe. Seeds left with fewer than ``tau_min`` photos are dropped and their
   photos go to the next nearest seed.

Coarser partitions (larger ``tau_max``) are unions of the next finer one's
cells within a country (weighted k-means on their seeds), so they nest by
construction, as the hierarchical prediction needs. One rule,
:meth:`SemanticCells.rows`, assigns gallery photos at build time and any
coordinate later, so a cell is the same region for both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from geo.core.geodesy import EARTH_RADIUS_KM, latlon_to_xyz, unit_vectors, xyz_to_latlon
from geo.data.countries import country_codes, country_index

COAST_KM = 50.0  # an "at sea" photo this close to a photo on land belongs to that photo's country
CLUSTER_SAMPLE = 5000  # photos per clustering run: its cost grows faster than linearly
MIN_CLUSTER = 5  # the density clustering's smallest cluster, in photos of the sample
KMEANS_SAMPLE = 50_000  # points k-means fits its centres on
MAX_DEPTH = 12
RESPLITS = 3  # passes that split again the cells the final assignment left over tau_max  # splits of one seed's share; identical coordinates cannot be split further anyway


@dataclass
class SemanticCells:
    """One semantic partition: the finest cells' seeds (shared by all partitions of a build) and this
    partition's grouping of them.

    ``country``: each seed's country (index into :func:`geo.data.countries.country_names`, -1 none).
    ``group``: each seed's row in this partition (the identity for the finest partition).
    """

    seed_lat: np.ndarray
    seed_lon: np.ndarray
    country: np.ndarray
    group: np.ndarray

    @property
    def n_cells(self) -> int:
        return int(self.group.max()) + 1 if len(self.group) else 0

    def tokens(self) -> list[str]:
        """``<ISO numeric>-<n>`` per cell (``sea-<n>`` for cells whose seeds lie in no country), unique."""
        codes = country_codes()
        first = np.full(self.n_cells, -1, np.int64)
        first[self.group[::-1]] = np.arange(len(self.group))[::-1]  # each cell's first seed names its country
        out, seen = [], {}
        for c in self.country[first].tolist():
            stem = "sea" if c < 0 else (codes[c] or f"x{c}")
            seen[stem] = seen.get(stem, 0) + 1
            out.append(f"{stem}-{seen[stem] - 1}")
        return out

    def seed_rows(self, lat, lon, country: np.ndarray | None = None) -> np.ndarray:
        """The nearest seed of each point's own country; of any country where its country has none. int64 [n].
        ``country``: the points' :func:`country_index`, when the caller has it (a build tests each photo once)."""
        lat, lon = np.asarray(lat, np.float64).ravel(), np.asarray(lon, np.float64).ravel()
        out = np.full(len(lat), -1, np.int64)
        if not len(lat) or not len(self.group):
            return out
        return nearest_seed(latlon_to_xyz(lat, lon), country_index(lat, lon) if country is None else country,
                            latlon_to_xyz(self.seed_lat, self.seed_lon), self.country)

    def rows(self, lat, lon, seeds: np.ndarray | None = None) -> np.ndarray:
        """Each point's row in this partition (``seeds``: the points' :meth:`seed_rows`, when known)."""
        seeds = self.seed_rows(lat, lon) if seeds is None else seeds
        return np.where(seeds >= 0, self.group[np.maximum(seeds, 0)], -1)


def nearest_seed(xyz: np.ndarray, country: np.ndarray, seed_xyz: np.ndarray, seed_country: np.ndarray) -> np.ndarray:
    """Row of the nearest seed in the point's country (Voronoi within borders), else the nearest anywhere."""
    from scipy.spatial import cKDTree  # here, not at the top: `geo query` never partitions and starts faster without

    out = cKDTree(seed_xyz).query(xyz)[1].astype(np.int64)
    for c in np.intersect1d(np.unique(country[country >= 0]), seed_country):
        pts, own = np.flatnonzero(country == c), np.flatnonzero(seed_country == c)
        out[pts] = own[cKDTree(seed_xyz[own]).query(xyz[pts])[1]]
    return out


def _coastal_countries(xyz: np.ndarray, country: np.ndarray) -> np.ndarray:
    """Country per photo, with photos at sea within COAST_KM of a photo on land given that photo's country."""
    from scipy.spatial import cKDTree

    sea, land = np.flatnonzero(country < 0), np.flatnonzero(country >= 0)
    if not len(sea) or not len(land):
        return country
    chord = 2 * math.sin(COAST_KM / EARTH_RADIUS_KM / 2)
    dist, near = cKDTree(xyz[land]).query(xyz[sea], distance_upper_bound=chord)
    out = country.copy()
    hit = np.isfinite(dist)
    out[sea[hit]] = country[land[near[hit]]]
    return out


def _cluster_centres(xyz: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Spherical means of the density clusters of (a sample of) these photos; [k, 3]."""
    from sklearn.cluster import HDBSCAN  # scikit-learn costs a cold `geo query` a second: only builds load it

    pick = np.sort(rng.choice(len(xyz), CLUSTER_SAMPLE, replace=False)) if len(xyz) > CLUSTER_SAMPLE else np.arange(len(xyz))
    lat, lon = xyz_to_latlon(xyz[pick])
    labels = HDBSCAN(min_cluster_size=max(2, min(MIN_CLUSTER, len(pick))), metric="haversine", algorithm="ball_tree",
                     copy=True).fit(np.radians(np.stack([lat, lon], 1))).labels_
    ids = np.unique(labels[labels >= 0])
    return np.stack([unit_vectors(xyz[pick][labels == k].sum(0)) for k in ids]) if len(ids) else np.empty((0, 3))


def _kmeans_centres(xyz: np.ndarray, k: int, seed: int, weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(centres [k', 3], label per point): weighted k-means on unit vectors, k' <= distinct points."""
    from sklearn.cluster import KMeans

    k = min(k, len(np.unique(xyz.round(9), axis=0)))
    if k < 2:
        return unit_vectors(xyz.sum(0, keepdims=True) if weight is None else (xyz * weight[:, None]).sum(0, keepdims=True)), \
            np.zeros(len(xyz), np.int64)
    fit = np.arange(len(xyz))
    if len(xyz) > KMEANS_SAMPLE:  # the centres from a seeded sample; every point then takes its nearest
        fit = np.sort(np.random.default_rng(seed).choice(len(xyz), KMEANS_SAMPLE, replace=False))
    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(
        xyz[fit], sample_weight=None if weight is None else weight[fit])
    centres = unit_vectors(km.cluster_centers_)
    return centres, np.argmax(xyz @ centres.T, axis=1).astype(np.int64)


def _split(xyz: np.ndarray, tau_max: int, rng: np.random.Generator, seed: int, depth: int = 0) -> list[np.ndarray]:
    """Seeds (unit vectors) for one country's (or one seed's share of) photos: its density clusters, each
    share over tau_max split again."""
    if len(xyz) <= tau_max or depth >= MAX_DEPTH:
        return [unit_vectors(xyz.sum(0))]
    centres = _cluster_centres(xyz, rng)
    enough = math.ceil(2 * len(xyz) / tau_max)
    if len(centres) > enough:
        # Density finds every hamlet: more clusters than cells of about tau_max / 2 photos would need. Neighbouring
        # clusters are merged (k-means on the centres, weighted by their shares), so cells stay near tau_max in
        # size like S2 cells, instead of tau_min-sized slivers that multiply the classes.
        counts = np.bincount(np.argmax(xyz @ centres.T, axis=1), minlength=len(centres)).astype(np.float64)
        keep = counts > 0
        centres, _ = _kmeans_centres(centres[keep], enough, seed, counts[keep])
    if len(centres) < 2:  # no density structure (or one blob): cut it into tau_max-sized pieces by distance
        centres, _ = _kmeans_centres(xyz, math.ceil(len(xyz) / tau_max), seed)
        if len(centres) < 2:
            return [centres[0]]
    share = np.argmax(xyz @ centres.T, axis=1)
    out: list[np.ndarray] = []
    for k in range(len(centres)):
        mine = xyz[share == k]
        if len(mine):
            out += _split(mine, tau_max, rng, seed, depth + 1)
    return out


def _drop_small(xyz, country, seed_xyz, seed_country, tau_min: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop seeds holding fewer than tau_min photos (their photos go to the next nearest), until none do."""
    while True:
        rows = nearest_seed(xyz, country, seed_xyz, seed_country)
        counts = np.bincount(rows, minlength=len(seed_xyz))
        small = counts < tau_min
        if not small.any() or small.all():
            return seed_xyz, seed_country, rows
        # drop the emptiest first: a neighbour's photos may lift the next one over tau_min
        drop = small & (counts <= np.quantile(counts[small], 0.5))
        seed_xyz, seed_country = seed_xyz[~drop], seed_country[~drop]


def _merge(seed_xyz: np.ndarray, seed_country: np.ndarray, counts: np.ndarray, tau_max: int, seed: int) -> np.ndarray:
    """Group cells (given by their seeds and photo counts) into coarser cells of at most tau_max photos where
    the cells allow it, never across a border: each cell's new row. Within a country, a group over tau_max
    is halved (weighted 2-means on the seeds) until it fits, which keeps the groups' sizes even; k-means
    with ceil(total / tau_max) centres lumps a dense city's cells into one oversized group."""
    group = np.empty(len(seed_xyz), np.int64)
    nxt = 0
    for c in np.unique(seed_country):
        todo = [np.flatnonzero(seed_country == c)]
        while todo:
            own = todo.pop()
            if counts[own].sum() <= tau_max or len(own) == 1:
                group[own] = nxt
                nxt += 1
                continue
            _, labels = _kmeans_centres(seed_xyz[own], 2, seed, counts[own].astype(np.float64))
            if labels.min() == labels.max():  # the seeds coincide: cut the list in two instead
                labels = (np.arange(len(own)) >= len(own) // 2).astype(np.int64)
            todo += [own[labels == 1], own[labels == 0]]
    return group


def semantic_cells(lat: np.ndarray, lon: np.ndarray, tau_min: int, tau_max: list[int],
                   seed: int = 0, country: np.ndarray | None = None) -> list[SemanticCells]:
    """One :class:`SemanticCells` per ``tau_max`` (sorted descending: coarse -> fine), nested by construction.
    ``country``: the photos' :func:`country_index`, when the caller has it (it locates the same photos next)."""
    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    if not len(lat):
        raise ValueError("semantic partitioner: no photos")
    rng = np.random.default_rng(seed)
    xyz, country = latlon_to_xyz(lat, lon), country_index(lat, lon) if country is None else np.asarray(country)
    home = _coastal_countries(xyz, country)
    seeds, seed_country = [], []
    for c in np.unique(home):
        mine = xyz[home == c]
        if len(mine) < tau_min:
            continue  # too few photos for a cell of its own: they join the nearest seeds
        s = _split(mine, tau_max[-1], rng, seed)
        seeds += s
        seed_country += [c] * len(s)
    if not seeds:  # every country below tau_min: one cell for the whole gallery
        seeds, seed_country = [unit_vectors(xyz.sum(0))], [-1]
    seed_xyz, seed_country, rows = _drop_small(xyz, country, np.stack(seeds), np.asarray(seed_country, np.int64), tau_min)
    for _ in range(RESPLITS):  # the final Voronoi assignment can give a seed more than its share: split those again
        counts = np.bincount(rows, minlength=len(seed_xyz))
        over = np.flatnonzero(counts > tau_max[-1])
        if not len(over):
            break
        extra = [(_split(xyz[rows == j], tau_max[-1], rng, seed), seed_country[j]) for j in over]
        keep = np.setdiff1d(np.arange(len(seed_xyz)), over)
        seed_xyz = np.concatenate([seed_xyz[keep], *[np.stack(e) for e, _ in extra]])
        seed_country = np.concatenate([seed_country[keep], *[np.full(len(e), c, np.int64) for e, c in extra]])
        seed_xyz, seed_country, rows = _drop_small(xyz, country, seed_xyz, seed_country, tau_min)
    counts = np.bincount(rows, minlength=len(seed_xyz))
    s_lat, s_lon = xyz_to_latlon(seed_xyz)
    groups = [np.arange(len(seed_xyz))]
    for t in reversed(tau_max[:-1]):  # each coarser partition groups the cells of the one below it
        below = groups[0]
        n_below = below.max() + 1
        below_xyz = unit_vectors(np.stack([np.bincount(below, weights=seed_xyz[:, a] * counts, minlength=n_below)
                                    for a in range(3)], 1))
        below_country = np.zeros(n_below, np.int64)
        below_country[below] = seed_country
        up = _merge(below_xyz, below_country, np.bincount(below, weights=counts, minlength=n_below), t, seed)
        groups.insert(0, up[below])
    return [SemanticCells(s_lat, s_lon, seed_country, g) for g in groups]
