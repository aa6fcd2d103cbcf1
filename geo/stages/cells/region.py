"""Region answers: the fewest km² of cells that hold the truth at a stated rate, with a conformal guarantee.

A photo's region grows from the cells stage's calibrated fine-cell posterior (f*,
:meth:`CellPredictor.fine_probs`): fine cells in order of posterior mass per km², while the mass taken
before a cell is at most a threshold. A coarser cell whose fine cells are all taken is taken whole instead
of them: the answer names few tokens, and (an adaptive partition leaving out places with few photos) holds
the photos that land in no fine cell.

The threshold is not the stated coverage: a posterior calibrated for log-likelihood is not calibrated for
sets. It is fitted by split conformal prediction on photos whose heads did not see their photographer (the
cells stage's own calibration photos): a photo's *score* is the least threshold whose region holds its true
place; the threshold for coverage c is the ceil((n + 1) c)-th smallest score, so a new photographer's photo,
exchangeable with those, lies inside its region with probability at least c. A photo in no cell at all scores
infinity; the map then asks for more mass.

One threshold for every photo holds c on average but not per photo: on the 150K testbed a region "at 0.5"
held the truth of 95 % of the most confident fifth of held-out photos and of 33 % of the least confident. So
the map is Mondrian by confidence (the posterior's top-cell mass, a thing every query has): the calibration
photos are split into :data:`CONFIDENCE_BINS` bins of it, each bin's thresholds fitted on half of the photos;
a photo's score is then the least grid level whose threshold *of its own bin* holds its truth, and the other
half's conformal quantile of that score picks the level for coverage c. The regions so indexed are nested, so
the guarantee above holds as it is (marginally), while a confident photo gets a smaller region and an
uncertain one a larger (a bin whose truths mostly lie in the first cell keeps covering more than c at low c:
no region is smaller than one cell).
"""
from __future__ import annotations

import bisect
import functools
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from geo.core import s2
from geo.core.geodesy import EARTH_RADIUS_KM
from geo.core.tables import Columns, columns_of, positions
from geo.stages.cells.partition import SEMANTIC_COLUMNS, locate, partitions_from_tables

DEFAULT_COVERAGE = 0.9
REPORT_COVERAGES = (0.5, 0.8, 0.9, 0.95)  # the levels geo bench and geo report state coverage and area for
GRID = np.round(np.arange(1, 200) / 200, 3)  # the stated coverages the conformal map holds: 0.005 .. 0.995
RASTER_LEVEL = 7  # the S2 level (cells of ~60-80 km) semantic cells are drawn on
SEED_LEVEL = 12  # a semantic cell smaller than a raster cell is drawn as the S2 cell of this level at its seed
CONFIDENCE_BINS = 5  # Mondrian bins of the posterior's top-cell mass, each with its own thresholds
BIN_PHOTOS = 500  # the fewest photos a bin's thresholds are fitted on: fewer bins (at least 2) or one map below that
# its shape in heads.json (geo.store.schema); "top" (bin edges) and "bin_mass" ([bins][GRID]) are absent from older
# bundles and small galleries' maps, whose "mass" is the one threshold for every photo
REGION_MAP = {"coverage": [float], "mass": [float], "photos": int, "top?": [float], "bin_mass?": [[float]]}
CHUNK = 1024  # posterior rows scored at a time: [rows, fine cells] floats
SHAPES_KEPT = 128  # regions whose GeoJSON shape is remembered (a served batch often repeats one: the same union)


def conformal_map(scores: np.ndarray, top: np.ndarray | None = None) -> dict[str, Any]:
    """The mass threshold for every stated coverage of :data:`GRID`, from calibration photos' scores; with the
    photos' top-cell masses (``top``) and enough photos, also per bin of it (Mondrian: the module's docstring).

    Split conformal with the finite-sample correction: coverage c takes the ceil((n + 1) c)-th smallest score;
    where that exceeds n (or is infinite: truth outside every cell) the threshold is 1, the whole posterior.
    """
    s = np.asarray(scores, np.float64)
    out = {"coverage": GRID.tolist(), "mass": _quantiles(s).tolist(), "photos": int(len(s))}
    bins = min(CONFIDENCE_BINS, len(s) // 2 // BIN_PHOTOS)
    if top is None or bins < 2:
        return out
    half = np.random.default_rng(0).permutation(len(s)) % 2 == 0  # bins' thresholds on one half, the level on the other
    top = np.asarray(top, np.float64)
    edges = np.unique(np.quantile(top[half], np.linspace(0, 1, bins + 1)[1:-1]))
    of = np.searchsorted(edges, top, side="right")
    if np.bincount(of[half], minlength=len(edges) + 1).min() < BIN_PHOTOS:  # tied masses (a prior): no bins
        return out
    per_bin = np.stack([_quantiles(s[half & (of == b)]) for b in range(len(edges) + 1)])  # [bins, GRID]
    held = s[~half, None] <= per_bin[of[~half]] + 1e-12  # nested: once held at a level, held at every higher one
    level = np.where(held.any(axis=1), held.argmax(axis=1), len(GRID))  # the least level holding the truth
    at = _quantiles(level.astype(np.float64), stored=False)  # the conformal quantile of the level, per GRID c
    with_one = np.concatenate([per_bin, np.ones((len(per_bin), 1))], axis=1)  # level len(GRID): the whole posterior
    return {**out, "top": edges.tolist(), "bin_mass": with_one[:, np.minimum(at, len(GRID)).astype(int)].tolist()}


def _quantiles(scores: np.ndarray, stored: bool = True) -> np.ndarray:
    """The ceil((n + 1) c)-th smallest score for every c of :data:`GRID` (infinite where that exceeds n); as a
    stored threshold (``stored``): at most 1, rounded up to 6 decimals, never holding less than its quantile."""
    s = np.sort(scores)
    n = len(s)
    k = np.ceil((n + 1) * GRID).astype(np.int64)
    q = np.where(k <= n, s[np.minimum(k, n) - 1] if n else np.inf, np.inf)
    if not stored:
        return q
    return np.clip(np.ceil(np.minimum(np.where(np.isfinite(q), q, 1.0), 1.0) * 1e6 - 1e-6) / 1e6, 0.0, 1.0) + 0.0


def mass_threshold(coverage: float, cmap: dict[str, Any] | None, top: float | None = None) -> tuple[float, bool]:
    """(mass threshold, calibrated) for a stated coverage: the map's value at the first grid level at or
    above it (never less coverage than asked), of the bin of the photo's top-cell mass ``top`` where the map
    has bins; without a map (an older bundle) the coverage itself."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], not {coverage}")
    if not cmap or not cmap.get("photos"):
        return float(coverage), False
    i = bisect.bisect_left(cmap["coverage"], coverage - 1e-9)  # sorted lists: numpy would copy them every call
    if i >= len(cmap["mass"]):
        return 1.0, True
    if top is not None and cmap.get("bin_mass"):
        return float(cmap["bin_mass"][bisect.bisect_right(cmap["top"], top)][i]), True
    return float(cmap["mass"][i]), True


def map_summary(cmap: dict[str, Any]) -> dict[str, Any]:
    """What the build records of a map in the manifest: its photos and the threshold at the reported levels
    (one for every photo; with bins, also each bin's, from the least confident)."""
    out = {"photos": cmap["photos"], "mass": {str(c): mass_threshold(c, cmap)[0] for c in REPORT_COVERAGES}}
    if cmap.get("bin_mass"):
        out["bins"] = {"top": cmap["top"], "mass": {str(c): [mass_threshold(c, cmap, t)[0] for t in
                                                             [0.0, *cmap["top"]]] for c in REPORT_COVERAGES}}
    return out


@dataclass
class Region:
    """One photo's region: the cells taken and what an answer says of them."""

    coverage: float  # the stated coverage
    calibrated: bool  # whether a conformal map set the threshold (else the posterior mass is the coverage)
    mass: float  # the posterior mass inside
    area_km2: float
    cells: list[np.ndarray]  # per partition, coarse to fine, the rows of the cells listed
    tokens: list[str]

    def to_dict(self, geometry: dict[str, Any] | None) -> dict[str, Any]:
        return {"coverage": self.coverage, "calibrated": self.calibrated, "mass": round(self.mass, 4),
                "area_km2": round(self.area_km2, 1), "cells": self.tokens, "geometry": geometry}


class RegionCells:
    """A bundle's cells as areas, nesting and shapes: what regions are grown over and drawn with.

    Regions take fine cells; a coarser cell all of whose fine cells are taken is taken whole, in their place.
    An adaptive S2 partition leaves out places with fewer than tau_min photos, so a coarse cell can be larger
    than its fine cells: taken whole, it also holds the photos that land in no fine cell.

    ``tables``: the cell tables, coarse to fine, as DataFrames or numpy columns (:mod:`geo.core.tables`)."""

    def __init__(self, tables: list[Any], names: list[str]):
        self.tables: list[Columns] = [columns_of(t) for t in tables]
        self.names = names
        self._polygons: dict[tuple[int, int], Any] = {}  # (partition, row) -> shapely polygon (immutable, shared)
        self._shapes: OrderedDict[tuple[tuple[int, ...], ...], dict[str, Any]] = OrderedDict()  # see geometry
        self._shapes_lock = threading.Lock()
        fine = self.tables[-1]
        self.semantic = set(SEMANTIC_COLUMNS) <= set(fine)
        self.tokens = [t["token"].astype(str).astype(object) for t in self.tables]
        self.parents = [positions(t["token"], fine[f"parent_{n}"]) for t, n in zip(self.tables[:-1], names[:-1])]
        self.children = [np.bincount(p, minlength=len(k)) for p, k in zip(self.parents, self.tokens[:-1])]
        fine_area = self._raster[1] if self.semantic else _areas_km2(s2.from_tokens(self.tokens[-1]))
        self.areas = [np.bincount(p, weights=fine_area, minlength=len(self.tokens[k])) if self.semantic
                      else _areas_km2(s2.from_tokens(self.tokens[k]))
                      for k, p in enumerate(self.parents)] + [fine_area]

    @property
    def fine_area(self) -> np.ndarray:
        return self.areas[-1]

    # ------------------------------------------------------------ shapes
    @cached_property
    def _raster(self) -> tuple[list[np.ndarray], np.ndarray]:
        """Semantic cells drawn on S2 cells of :data:`RASTER_LEVEL`: each fine cell's raster cell ids (the
        raster cells whose centre it holds; a cell holding none gets the :data:`SEED_LEVEL` cell at its seed)
        and its area, their sum."""
        ids, lat, lon, cell_area = _raster_cells(RASTER_LEVEL)
        rows = locate(partitions_from_tables(self.tables, self.names)[-1:], lat, lon)[:, 0]
        n = len(self.tokens[-1])
        area = np.bincount(rows[rows >= 0], weights=cell_area[rows >= 0], minlength=n)
        by_row = np.argsort(rows, kind="stable")
        members = np.split(ids[by_row], np.searchsorted(rows[by_row], np.arange(n + 1)))[1:-1]
        fine = self.tables[-1]
        seeds = s2.parent_ids(s2.leaf_ids(fine["seed_lat"].astype(float), fine["seed_lon"].astype(float)),
                              SEED_LEVEL)
        empty = np.flatnonzero(area == 0)
        area[empty] = _areas_km2(seeds[empty])
        for r in empty.tolist():
            members[r] = seeds[r:r + 1]
        return members, area

    def _polygon(self, k: int, row: int):
        """The shapely polygon of one cell of partition k ([lon, lat] degrees), made once per bundle: a region
        at 0.9 draws about a hundred cells, and building their polygons cost as much as merging them."""
        shape = self._polygons.get((k, row))
        if shape is None:
            shape = self._polygons[(k, row)] = self._drawn(k, row)
        return shape

    def _drawn(self, k: int, row: int):
        """One cell's shape: an S2 cell's ring, or the union of a semantic cell's raster cells (thousands for a
        country-sized cell: their rings and polygons are made as arrays, 25 s one at a time for the world)."""
        import shapely
        from shapely.geometry import Polygon

        if not self.semantic:
            return Polygon(_unwrapped(np.array([s2.cell_ring(self.tokens[k][row])]))[0])
        fine = [row] if k == len(self.tables) - 1 else np.flatnonzero(self.parents[k] == row)
        rings = s2.cell_rings(np.concatenate([self._raster[0][f] for f in fine]))
        return shapely.union_all(shapely.polygons(_unwrapped(rings)))

    def geometry(self, region: Region) -> dict[str, Any]:
        """A GeoJSON MultiPolygon of a region's cells, adjacent cells merged (shapely 2). The union is most of
        a region's cost (4 ms for a hundred cells); the same cells always give the same shape, so the last
        :data:`SHAPES_KEPT` are remembered and handed out shared: read them, do not change them."""
        key = tuple(tuple(rows.tolist()) for rows in region.cells)
        with self._shapes_lock:  # `geo serve` answers batches on several model threads
            shape = self._shapes.get(key)
            if shape is not None:
                self._shapes.move_to_end(key)
                return shape
        shape = self._merged(region.cells)
        with self._shapes_lock:
            self._shapes[key] = shape
            if len(self._shapes) > SHAPES_KEPT:
                self._shapes.popitem(last=False)
        return shape

    def _merged(self, cells: list[np.ndarray]) -> dict[str, Any]:
        """The union of a region's cells as a GeoJSON MultiPolygon.

        A region at 0.9 lists about 140 cells of several S2 levels in a couple of dozen separate pieces. The
        zero-distance buffer of their MultiPolygon is their union (a buffer is a Minkowski sum; GEOS nodes every
        cell's edges at once and keeps what lies inside any cell) and always valid. On the 6,047 distinct regions
        of the realistic testbed's 1,500 query photos at coverages 0.5-0.99 it took 2.8 ms against 5.6 for
        ``disjoint_subset_union_all``, 7.8 for ``unary_union``; the shapes differ by at most 1e-15 of their
        area (floating-point noding at the seams where a coarse cell meets finer ones), every one valid, with
        the same pieces (benchmarks/RESULTS.md, issue 25). A semantic cell may itself be several polygons."""
        import shapely

        polygons = shapely.get_parts([self._polygon(k, int(r)) for k, rows in enumerate(cells) for r in rows])
        return _geojson_multipolygon(shapely.multipolygons(polygons).buffer(0))

    # ------------------------------------------------------------ growing regions
    def ordered(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(fine rows in order of mass per km², mass taken before each of them) per posterior row."""
        order = np.argsort(-(probs / self.fine_area), axis=1, kind="stable")
        p = probs[np.arange(len(probs))[:, None], order]  # take_along_axis's values, without its index building
        return order, np.cumsum(p, axis=1) - p

    def _taken_at(self, before: np.ndarray) -> list[np.ndarray]:
        """Per partition, the threshold from which each cell is in the region, [n, cells]: a fine cell's mass
        before it; a coarser cell's, the largest of its fine cells' (infinite without fine cells)."""
        out = []
        for k, parent in enumerate(self.parents):
            at = np.full((len(before), len(self.children[k])), -np.inf)
            np.maximum.at(at, (slice(None), parent), before)
            out.append(np.where(self.children[k] > 0, at, np.inf))
        return out + [before]

    def scores(self, probs: np.ndarray, truth: np.ndarray) -> np.ndarray:
        """The conformal score of each photo: the least threshold whose region holds its true place
        (``truth``: its row in every partition [n, partitions], -1 in none; in no cell at all: infinity)."""
        truth = np.asarray(truth, np.int64)
        out = np.full(len(truth), np.inf)
        for start in range(0, len(truth), CHUNK):
            order, before = self.ordered(np.asarray(probs[start:start + CHUNK], np.float64))
            by_cell = np.empty_like(before)
            np.put_along_axis(by_cell, order, before, axis=1)
            t, n = truth[start:start + CHUNK], np.arange(len(before))
            for k, at in enumerate(self._taken_at(by_cell)):
                ok = t[:, k] >= 0
                out[start:start + CHUNK][ok] = np.minimum(out[start:start + CHUNK][ok], at[n[ok], t[ok, k]])
        return out

    def region(self, probs: np.ndarray, coverage: float, cmap: dict[str, Any] | None,
               ordered: tuple[np.ndarray, np.ndarray] | None = None) -> Region:
        """The region of one fine posterior row at a stated coverage (``ordered``: the row's :meth:`ordered`,
        when the caller grows several regions of it)."""
        return self.regions_at(probs, [coverage], cmap, ordered)[0]

    def regions_at(self, probs: np.ndarray, coverages: list[float], cmap: dict[str, Any] | None,
                   ordered: tuple[np.ndarray, np.ndarray] | None = None) -> list[Region]:
        """:meth:`region` at each of several coverages of one row, grown and compacted together (an answer
        grows four: one pass over the cells for all of them, not one each)."""
        top = float(np.max(probs))
        thresholds = [mass_threshold(c, cmap, top) for c in coverages]
        order, before = ordered or self.ordered(np.asarray(probs, np.float64)[None])
        taken = np.zeros((len(coverages), len(self.fine_area)), bool)
        for row, (threshold, _) in zip(taken, thresholds):
            row[order[0][before[0] <= threshold + 1e-12]] = True
        probs = np.asarray(probs)
        out = []
        for c, (_, calibrated), mask, cells in zip(coverages, thresholds, taken, self._compact(taken)):
            out.append(Region(float(c), calibrated, float(probs[mask].sum()),
                              float(sum(self.areas[k][r].sum() for k, r in enumerate(cells))), cells,
                              [t for k, r in enumerate(cells) for t in self.tokens[k][r].tolist()]))
        return out

    def _compact(self, taken: np.ndarray) -> list[list[np.ndarray]]:
        """Per region (a row of ``taken`` [regions, fine cells]) and partition, the rows listed for these fine
        cells: the coarsest cell all of whose fine cells are taken replaces them."""
        covered = np.zeros_like(taken)
        per_partition = []
        for k, parent in enumerate(self.parents):
            whole = (_per_parent(taken, parent, len(self.children[k])) == self.children[k]) & (self.children[k] > 0)
            whole &= _per_parent(covered, parent, len(self.children[k])) < self.children[k]  # not in a coarser one
            per_partition.append(_rows_of(whole))
            covered |= whole[:, parent]
        per_partition.append(_rows_of(taken & ~covered))
        return [list(rows) for rows in zip(*per_partition)]

    def answers(self, probs: np.ndarray, coverage: float, cmap: dict[str, Any] | None) -> list[dict[str, Any]]:
        """:meth:`answer` for every row of a posterior batch [n, C], sorted in one call."""
        order, before = self.ordered(np.asarray(probs, np.float64))
        return [self.answer(row, coverage, cmap, (order[i:i + 1], before[i:i + 1])) for i, row in enumerate(probs)]

    def answer(self, probs: np.ndarray, coverage: float, cmap: dict[str, Any] | None,
               ordered: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
        """``Answer.region``: the region at ``coverage`` with its GeoJSON geometry, and the regions at
        :data:`REPORT_COVERAGES` (coverage, mass, area, cells) that ``geo bench`` scores without the geometry
        (``ordered``: the row's :meth:`ordered`, when the caller sorted a batch)."""
        ordered = ordered or self.ordered(np.asarray(probs, np.float64)[None])  # one sort for every coverage below
        levels = sorted({coverage, *REPORT_COVERAGES})
        grown = dict(zip(levels, self.regions_at(probs, levels, cmap, ordered)))
        region, curve = grown[coverage], [grown[c].to_dict(None) for c in REPORT_COVERAGES]
        return {**region.to_dict(self.geometry(region)),
                "curve": [{k: c[k] for k in ("coverage", "mass", "area_km2", "cells")} for c in curve]}

    def contains(self, cells: list[list[str]], lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        """Whether each point lies in its region (``cells``: the region's tokens, of any partition): its cell
        of some partition is listed. Exact for S2 and semantic cells alike, unlike a point-in-polygon test."""
        rows = locate(partitions_from_tables(self.tables, self.names), lat, lon)
        own = [[str(self.tokens[k][r]) for k, r in enumerate(row) if r >= 0] for row in rows]
        return np.array([bool(set(o) & set(c)) for o, c in zip(own, cells)], dtype=bool)


def _areas_km2(ids: np.ndarray) -> np.ndarray:
    """The cells' exact spherical areas (km²)."""
    return s2.cell_geometry(ids)[2] * EARTH_RADIUS_KM ** 2


@functools.cache
def _raster_cells(level: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every S2 cell of one level: ids, centre latitudes and longitudes (degrees), exact areas (km²), read-only:
    the same for every semantic bundle, so once per process (0.15 s for the 98K cells of level 7)."""
    ids = s2.level_ids(level)
    lat, lon, area = s2.cell_geometry(ids)
    out = (ids, lat, lon, area * EARTH_RADIUS_KM ** 2)
    for a in out:
        a.flags.writeable = False
    return out


def _unwrapped(rings: np.ndarray) -> np.ndarray:
    """Rings [n, points, (lon, lat)] with those that cross the antimeridian given their western longitudes moved
    past 180, so each stays one shape (in place)."""
    lon = rings[..., 0]
    lon[((lon.max(axis=1) - lon.min(axis=1)) > 180)[:, None] & (lon < 0)] += 360
    return rings


def _geojson_multipolygon(shape) -> dict[str, Any]:
    """A shapely (Multi)Polygon's polygons as a GeoJSON MultiPolygon with RFC 7946's winding (exterior rings
    counter-clockwise, holes clockwise): the coordinates read out in a few array calls, not ring by ring
    through ``mapping`` (0.3 ms instead of 1.0 for a region of two dozen pieces and ~35 rings; the same
    coordinates)."""
    import shapely

    parts = shapely.get_parts(shape)
    parts = shapely.orient_polygons(parts[(shapely.get_type_id(parts) == shapely.GeometryType.POLYGON)
                                          & ~shapely.is_empty(parts)])
    rings, part_of = shapely.get_rings(parts, return_index=True)
    xy, ring_of = shapely.get_coordinates(rings, return_index=True)
    bounds = np.searchsorted(ring_of, np.arange(len(rings) + 1)).tolist()  # ring r is points[bounds[r]:bounds[r + 1]]
    points = list(map(tuple, xy.tolist()))  # one conversion, not one per ring (a region has ~50 rings with holes)
    polygons: list[list[tuple]] = [[] for _ in parts]
    for part, start, stop in zip(part_of.tolist(), bounds[:-1], bounds[1:]):
        polygons[part].append(tuple(points[start:stop]))
    return {"type": "MultiPolygon", "coordinates": [tuple(p) for p in polygons]}


def _per_parent(mask: np.ndarray, parent: np.ndarray, size: int) -> np.ndarray:
    """[regions, parents]: how many of each parent's fine cells each row of ``mask`` [regions, fine] holds."""
    n = len(mask)
    return np.bincount((np.arange(n)[:, None] * size + parent)[mask], minlength=n * size).reshape(n, size)


def _rows_of(mask: np.ndarray) -> list[np.ndarray]:
    """The column indices set in each row of a 2-D mask."""
    r, c = np.nonzero(mask)
    ends = [0, *np.searchsorted(r, np.arange(1, len(mask))).tolist(), len(c)]
    return [c[a:b] for a, b in zip(ends[:-1], ends[1:])]  # np.split's slices, without its per-piece calls
