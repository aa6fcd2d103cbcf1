"""Support points: where each fine cell's gallery photos are, so a decision can name a photo spot, not a cell mean.

A fine cell's Class2GPS mean can fall between the towns its photos come
from. The decision (:func:`decide`) instead spreads each fine cell's
posterior over the cell's photo spots in proportion to their photos. With
the posterior equal to the gallery prior, the point with most mass within
750 km is then exactly the population prior (the gallery spot covering most
gallery photos within 750 km); evidence from the heads moves it from there.

Spots are photos pooled by S2 cell at :data:`SPOT_LEVEL` (about 1 km), at most
:data:`SUPPORT_BUDGET` in all: a cell with more spots keeps its busiest and
gives the others' photos to the nearest kept one, so every cell keeps its
whole mass. A cell without photos (imported partitions) is one spot at its
published mean.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from geo.core import s2
from geo.core.geodesy import EARTH_RADIUS_KM, latlon_to_xyz, xyz_to_latlon

if TYPE_CHECKING:
    import pandas as pd

SPOT_LEVEL = 13  # S2 level-13 cells are ~1 km across: finer than every benchmark radius above 1 km
SUPPORT_BUDGET = 16_384  # bounds a query's work on MP-16-sized partitions (12,893 fine cells -> 1 spot each)
EXACT_SPOTS = 1024  # up to this many spots, every spot is scored for every query: the decision is exact
MAX_CANDIDATES = 256  # beyond: the spots of the cells with most mass near their means (cost: candidates x spots)
DECISION_RADII_KM = (750.0, 200.0, 25.0)  # most mass within 750 km first; ties go to 200 km, then 25 km


def support_points(lat: np.ndarray, lon: np.ndarray, fine_rows: np.ndarray, fine_table: pd.DataFrame,
                   budget: int = SUPPORT_BUDGET) -> pd.DataFrame:
    """Spots per fine cell: columns ``cell`` (fine row), ``lat``, ``lon``, ``count`` (photos it stands for).

    ``fine_rows``: each photo's fine-cell row (-1: in none, ignored).
    """
    import pandas as pd  # the build's work: a query only reads the spots

    n_cells = len(fine_table)
    inside = fine_rows >= 0
    xyz = latlon_to_xyz(lat[inside], lon[inside])
    spots = pd.DataFrame({"cell": fine_rows[inside].astype(np.int64),
                          "spot": s2.parent_ids(s2.leaf_ids(lat[inside], lon[inside]), SPOT_LEVEL),
                          "x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2], "count": 1})
    spots = spots.groupby(["cell", "spot"], sort=True).sum().reset_index()
    spots = spots.sort_values(["cell", "count"], ascending=[True, False], kind="stable").reset_index(drop=True)
    per_cell = max(1, budget // max(n_cells, 1))
    kept = spots.groupby("cell").cumcount().to_numpy() < per_cell
    out = spots[kept].reset_index(drop=True)
    dropped = spots[~kept]
    if len(dropped):
        # each dropped spot's photos go to the nearest kept spot of its cell (largest dot product of unit vectors)
        pairs = dropped.reset_index().merge(out.reset_index(), on="cell", suffixes=("", "_kept"))
        dot = (pairs["x"] * pairs["x_kept"] + pairs["y"] * pairs["y_kept"] + pairs["z"] * pairs["z_kept"])
        best = pairs.loc[dot.groupby(pairs["index"]).idxmax()]
        out["count"] += np.bincount(best["index_kept"], weights=best["count"], minlength=len(out)).astype(np.int64)
    s_lat, s_lon = xyz_to_latlon(out[["x", "y", "z"]].to_numpy())
    table = pd.DataFrame({"cell": out["cell"].to_numpy(np.int32), "lat": s_lat, "lon": s_lon,
                          "count": out["count"].to_numpy(np.int64)})
    empty = np.setdiff1d(np.arange(n_cells), table["cell"].to_numpy())
    if len(empty):
        table = pd.concat([table, pd.DataFrame({"cell": empty.astype(np.int32),
                                                "lat": fine_table["lat"].to_numpy(float)[empty],
                                                "lon": fine_table["lon"].to_numpy(float)[empty],
                                                "count": np.ones(len(empty), np.int64)})])
        table = table.sort_values("cell", kind="stable").reset_index(drop=True)
    return table


def check_support(support: Any, n_cells: int, where: str) -> None:
    """Every fine cell needs a spot, or its posterior mass would vanish from the decision (``support``: a
    DataFrame or numpy columns, :mod:`geo.core.tables`)."""
    missing = {"cell", "lat", "lon", "count"} - set(support)
    if missing:
        raise ValueError(f"{where}: support table lacks columns {sorted(missing)}")
    cells = np.asarray(support["cell"])
    if len(cells) and (cells.min() < 0 or cells.max() >= n_cells):
        raise ValueError(f"{where}: support names cells outside 0..{n_cells - 1}")
    if len(np.unique(cells)) != n_cells or (np.asarray(support["count"]) <= 0).any():
        raise ValueError(f"{where}: every fine cell needs at least one support spot with a positive count")


class SupportDecision:
    """The Bayes answer for 'within r km' scores: the spot with most posterior mass within each radius in turn."""

    def __init__(self, support: Any, cell_lat: np.ndarray, cell_lon: np.ndarray):
        """``support``: the spots' ``cell``, ``lat``, ``lon`` and ``count`` (a DataFrame or numpy columns)."""
        self.cell = np.asarray(support["cell"], np.int64)
        self.lat, self.lon = np.asarray(support["lat"], float), np.asarray(support["lon"], float)
        self.xyz = latlon_to_xyz(self.lat, self.lon)
        count = np.asarray(support["count"], float)
        self.share = count / np.bincount(self.cell, weights=count, minlength=len(cell_lat))[self.cell]
        self.spots_per_cell = np.bincount(self.cell, minlength=len(cell_lat))
        self.cell_xyz = latlon_to_xyz(cell_lat, cell_lon)
        self._near: dict[float, object] = {}
        # every spot is a candidate for every query up to EXACT_SPOTS: their dot products never change
        self._all_dots = self.xyz @ self.xyz.T if len(self.cell) <= EXACT_SPOTS else None

    def _cells_within(self, cos_r: float):
        """Sparse [C, C]: cell means within the radius of each other; built once per radius, in row blocks."""
        from scipy.sparse import csr_matrix, vstack

        if cos_r not in self._near:
            blocks = [csr_matrix(self.cell_xyz[b:b + 1024] @ self.cell_xyz.T >= cos_r)
                      for b in range(0, len(self.cell_xyz), 1024)]
            self._near[cos_r] = vstack(blocks).astype(np.float32).tocsr()  # ranks only; half the memory of float64
        return self._near[cos_r]

    def _candidates(self, fine: np.ndarray, cos_r: float) -> tuple[np.ndarray, np.ndarray]:
        """(candidate spots, their dot products with every spot): all spots up to EXACT_SPOTS, else the spots of
        the cells with most mass within the first radius (cell means), plus the most probable cell."""
        if self._all_dots is not None:
            return np.arange(len(self.cell)), self._all_dots
        cell_mass = self._cells_within(cos_r) @ fine.astype(np.float32)
        top = np.argpartition(-cell_mass, min(MAX_CANDIDATES, len(cell_mass)) - 1)[:MAX_CANDIDATES]
        top = top[np.argsort(-cell_mass[top], kind="stable")]  # every cell has a spot: these cells suffice
        enough = np.searchsorted(np.cumsum(self.spots_per_cell[top]), MAX_CANDIDATES) + 1
        chosen = np.zeros(len(fine), bool)
        chosen[top[:enough]] = True
        chosen[int(np.argmax(fine))] = True
        cand = np.flatnonzero(chosen[self.cell])
        return cand, self.xyz[cand] @ self.xyz.T

    def decide(self, fine_probs: np.ndarray, radii_km=DECISION_RADII_KM) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lat, lon, mass within the first radius) per row of fine-cell probabilities [n, C].

        Lexicographic: the most mass within radii_km[0]; among spots tied on it
        (the same gallery photos within reach), the most within radii_km[1], and so on.
        """
        cos_r = np.cos(np.asarray(radii_km, dtype=np.float64) / EARTH_RADIUS_KM)
        fine_probs = np.atleast_2d(np.asarray(fine_probs, dtype=np.float64))
        lat, lon, mass = np.empty(len(fine_probs)), np.empty(len(fine_probs)), np.empty(len(fine_probs))
        for i, fine in enumerate(fine_probs):
            weight = fine[self.cell] * self.share
            cand, dots = self._candidates(fine, cos_r[0])
            keep = np.arange(len(cand))
            first = None
            for c in cos_r:
                m = (dots[keep] >= c) @ weight
                first = m.max() if first is None else first
                keep = keep[m >= m.max() - 1e-12]
            best = cand[keep[0]]
            lat[i], lon[i], mass[i] = self.lat[best], self.lon[best], first
        return lat, lon, mass
