"""Which country a coordinate lies in, offline: Natural Earth's 1:50m country shapes (the ``world-atlas``
npm package geo already vendors for its map page), in one shapely STRtree built once per process: a query's
point costs tens of microseconds, and a million gallery photos are tested in one vectorised call.

Why shapes and not the nearest city: near a border the nearest GeoNames place is often across it, and a
point at sea has a nearest city too. Truth and prediction go through the same function, so country
accuracy in ``geo bench`` and ``geo report`` compares like with like. Codes are ISO 3166-1 numeric (what
the shapes carry); a handful of disputed areas have a name and no code. A point in no shape but within
:data:`COAST_KM` of one (a harbour or beach the 1:50m coastline cuts off: Lisbon, San Francisco's Marina)
has the nearest shape's country; further out at sea, none.
"""
from __future__ import annotations

import functools
import json
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely

from geo.core.geodesy import EARTH_RADIUS_KM, haversine_km

# Vendored once for the map page (geo/serve/static/vendor, with its licence); this module only reads it.
SHAPES = Path(__file__).resolve().parents[1] / "serve" / "static" / "vendor" / "countries-50m.json"
CHUNK = 200_000  # points per pass: a shapely point each, and the tree's (point, ring) pairs
FEW = 8  # at most this many points go one at a time (:func:`_few_inside`); more, through the tree at once
COAST_KM = 25.0  # a point in no shape but this near one takes its country (the 1:50m coast cuts off harbours)
KM_PER_DEGREE = EARTH_RADIUS_KM * np.pi / 180
# GEOS builds a prepared polygon's edge index on its first test, which is not safe from two threads at once
# (geo serve answers from several); the tests hold this lock, and uncontended it costs nothing.
_PREPARED = threading.Lock()


@dataclass(frozen=True)
class _Shapes:
    """Every ring of every country as a filled polygon, in one STRtree. A ring that crosses the antimeridian
    is stored unwrapped (longitudes past 180) and once more a turn away, so a point given in [-180, 180)
    finds it on either side."""

    names: list[str]
    codes: list[str | None]
    polygons: np.ndarray  # shapely Polygons: the rings filled, plus the copies a turn away
    ring: np.ndarray  # int64 [polygons]: which ring each is (a ring and its copy share one)
    country: np.ndarray  # int64 [polygons]: index into names
    tree: shapely.STRtree
    bounds: np.ndarray  # float64 [4, polygons]: min x, min y, max x, max y (the tree's boxes, for a few points)


def _read_topology(path: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """(the TopoJSON without its arcs, every arc's points flat [points, 2] as stored, each arc's length).

    The arcs are 94 % of the file's 0.75 MB; ``json.loads`` made them 160K small Python lists (45-60 ms of a
    cold query, and 10 ms more to flatten them), where numpy's text parser reads their numbers in one pass.
    The rest, the countries and the transform, is plain JSON. The file is vendored: a layout other than
    the topology's own arcs last is refused rather than misread."""
    text = path.read_text()
    start = text.rfind('"arcs":[[[')  # the topology's own arcs follow its objects, whose polygons name arcs too
    end = text.find("]]]", start) + 3  # in the arcs array only its end has three brackets: point, arc, array
    topo = json.loads(text[:start] + '"arcs":[]' + text[end:]) if start >= 0 and end >= 3 else {}
    body = text[start + len('"arcs":'):end]
    lengths = np.array([arc.count("],[") + 1 for arc in body[2:-2].split("]],[[")], np.int64)
    flat = np.fromstring(body.translate(_BRACKETS), dtype=np.float64, sep=",")
    if topo.get("arcs") != [] or len(flat) != 2 * lengths.sum():
        raise ValueError(f"{path}: not a TopoJSON topology whose arcs are its last array")
    return topo, flat.reshape(-1, 2), lengths


_BRACKETS = str.maketrans("[]", "  ")  # an arc's brackets as blanks: its numbers are then comma-separated


def _decode_arcs(topo: dict, flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """TopoJSON's quantised, delta-encoded arcs -> [k, 2] lon/lat arrays (one cumulative sum over all of them,
    restarted at each arc: a loop of 2,000 small cumsums cost a cold query 0.2 s)."""
    scale, shift = np.array(topo["transform"]["scale"]), np.array(topo["transform"]["translate"])
    total = np.cumsum(flat, axis=0)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    before = np.where(starts[:, None] > 0, total[np.maximum(starts - 1, 0)], 0.0)
    absolute = total - np.repeat(before, lengths, axis=0)
    return np.split(absolute * scale + shift, np.cumsum(lengths)[:-1])


def _ring(arcs: list[np.ndarray], refs: list[int]) -> np.ndarray:
    parts = []
    for k, r in enumerate(refs):
        a = arcs[r] if r >= 0 else arcs[~r][::-1]
        parts.append(a if k == 0 else a[1:])
    return np.concatenate(parts)


def _unwrapped(rings: list[np.ndarray]) -> list[np.ndarray]:
    """The rings that cross the antimeridian made continuous (longitudes past 180). A ring crosses where
    neighbours jump by more than 180 degrees, other than along a pole (Antarctica's ring runs from -180 to
    180 and comes back along latitude -90, a true edge in the plane). Found over all rings at once: a
    numpy pass per ring cost a cold query 30 ms."""
    xy = np.concatenate(rings)
    which = np.repeat(np.arange(len(rings)), [len(r) for r in rings])
    jump = (np.abs(np.diff(xy[:, 0])) > 180) & (which[1:] == which[:-1])
    polar = (np.abs(xy[:-1, 1]) > 89.9) & (np.abs(xy[1:, 1]) > 89.9)
    for k in np.unique(which[1:][jump & ~polar]).tolist():
        rings[k][:, 0] = np.rad2deg(np.unwrap(np.deg2rad(rings[k][:, 0])))
    return rings


@functools.cache
def _shapes() -> _Shapes:
    """Read once per process (0.1 s for 1,600 rings and 100K vertices); every lookup shares it."""
    topo, flat, lengths = _read_topology(SHAPES)
    arcs = _decode_arcs(topo, flat, lengths)
    names, codes, rings, owner = [], [], [], []
    for g in topo["objects"]["countries"]["geometries"]:
        polygons = {"Polygon": [g.get("arcs", [])], "MultiPolygon": g.get("arcs", [])}.get(g["type"], [])
        if not polygons:
            continue
        names.append(g.get("properties", {}).get("name", "?"))
        codes.append(str(g["id"]) if g.get("id") is not None else None)
        rings += [_ring(arcs, refs) for polygon in polygons for refs in polygon]
        owner += [len(names) - 1] * sum(len(polygon) for polygon in polygons)
    rings = _unwrapped(rings)
    which = np.repeat(np.arange(len(rings)), [len(r) for r in rings])
    edges = shapely.linearrings(np.concatenate(rings), indices=which)
    # two rings cross themselves: GEOS tests a point against them by crossings, as the even-odd rule wants
    filled = shapely.polygons(edges)
    lo, hi = shapely.bounds(filled)[:, 0], shapely.bounds(filled)[:, 2]
    east, west = np.flatnonzero(lo < -180), np.flatnonzero(hi > 180)  # the copies a turn away
    polygons = np.concatenate([filled, shapely.transform(filled[east], lambda c: c + [360, 0]),
                               shapely.transform(filled[west], lambda c: c - [360, 0])])
    ring = np.concatenate([np.arange(len(filled)), east, west])
    shapely.prepare(polygons)  # each polygon indexes its edges on its first test: then a test is O(log n)
    return _Shapes(names, codes, polygons, ring, np.asarray(owner, np.int64)[ring], shapely.STRtree(polygons),
                   np.ascontiguousarray(shapely.bounds(polygons).T))


def country_index(lat, lon) -> np.ndarray:
    """For each point, the index of its country in :func:`country_names` (-1: in none, i.e. at sea).

    A point is in a country when an odd number of the country's rings hold it (inside an outer ring and not
    in its hole; which ring of a polygon is outer cannot be read from the order: in the spherical TopoJSON,
    Antarctica's coastline comes second, after a sliver at the pole). A point in none but within
    :data:`COAST_KM` of one takes the nearest (see :func:`_coastal`). In chunks of :data:`CHUNK` points, so a
    gallery of millions fits in memory."""
    lat = np.asarray(lat, np.float64).ravel()
    lon = np.asarray(lon, np.float64).ravel()
    return np.concatenate([_country_index(lat[s:s + CHUNK], lon[s:s + CHUNK])
                           for s in range(0, len(lat), CHUNK)] or [np.empty(0, np.int64)])


def _country_index(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    shapes = _shapes()
    out = np.full(len(lat), -1, np.int64)
    ok = np.flatnonzero(np.isfinite(lat) & np.isfinite(lon))
    x, y = (lon[ok] + 180) % 360 - 180, lat[ok]
    out[ok] = _few_inside(x, y, shapes) if len(ok) <= FEW else _inside(x, y, shapes)
    sea = np.flatnonzero(out[ok] < 0)
    out[ok[sea]] = _coastal(x[sea], y[sea], shapes)
    return out


def _inside(x: np.ndarray, y: np.ndarray, shapes: _Shapes) -> np.ndarray:
    """The country whose shapes hold each point (-1: none), through the tree, all points in one pass."""
    out = np.full(len(x), -1, np.int64)
    with _PREPARED:
        at, hit = shapes.tree.query(shapely.points(x, y))  # the rings whose box holds the point; then the exact test
        inside = shapely.intersects_xy(shapes.polygons[hit], x[at], y[at])
    at, hit = at[inside], hit[inside]
    # even-odd per country: a ring counts once per point (a point on the antimeridian may touch a ring and its copy)
    at_ring = np.unique(at * len(shapes.ring) + shapes.ring[hit])
    at, ring = at_ring // len(shapes.ring), at_ring % len(shapes.ring)
    n = len(shapes.names)
    at_country, times = np.unique(at * n + shapes.country[ring], return_counts=True)
    odd = at_country[times % 2 == 1]
    first = np.unique(odd // n, return_index=True)[1]  # on a shared border, the first country of the list
    out[odd[first] // n] = odd[first] % n
    return out


def _few_inside(x: np.ndarray, y: np.ndarray, shapes: _Shapes) -> np.ndarray:
    """:func:`_inside` for a few points (a query's answer), one at a time: the same boxes (edges included, as
    the tree's) and the same even-odd rule, without the tree's geometries or the sorts that pay off in bulk.
    Those took a one-photo answer 0.4 ms; this takes 0.24."""
    out = np.full(len(x), -1, np.int64)
    lo_x, lo_y, hi_x, hi_y = shapes.bounds
    for i, (px, py) in enumerate(zip(x.tolist(), y.tolist())):
        boxed = np.flatnonzero((lo_x <= px) & (px <= hi_x) & (lo_y <= py) & (py <= hi_y))
        with _PREPARED:
            inside = boxed[shapely.intersects_xy(shapes.polygons[boxed], px, py)]
        times = Counter(shapes.country[r] for r in set(shapes.ring[inside].tolist()))
        out[i] = min((c for c, t in times.items() if t % 2 == 1), default=-1)
    return out


def _coastal(x: np.ndarray, y: np.ndarray, shapes: _Shapes) -> np.ndarray:
    """The country of the nearest ring within :data:`COAST_KM` of each point (-1: none that near).

    The 1:50m coastline cuts off harbours, beaches and estuaries (Lisbon, San Francisco's Marina), which are
    not at sea. Candidates are the rings within the box of COAST_KM around the point in degrees (a degree
    of longitude shrinks with the cosine of the latitude), and each one's nearest point is then measured
    in km on the sphere."""
    out = np.full(len(x), -1, np.int64)
    if not len(x):
        return out
    points = shapely.points(x, y)
    north = COAST_KM / KM_PER_DEGREE
    east = north / np.maximum(np.cos(np.radians(y)), 0.01)
    with _PREPARED:
        at, hit = shapes.tree.query(shapely.box(x - east, y - north, x + east, y + north))
        near = shapely.dwithin(shapes.polygons[hit], points[at], east[at])
        at, hit = at[near], hit[near]
        spot = shapely.get_point(shapely.shortest_line(points[at], shapes.polygons[hit]), 1)
    km = haversine_km(y[at], x[at], shapely.get_y(spot), shapely.get_x(spot))
    order = np.lexsort((km, at))  # by point, nearest first
    at, hit, km = at[order], hit[order], km[order]
    first = np.unique(at, return_index=True)[1]
    close = km[first] <= COAST_KM
    out[at[first][close]] = shapes.country[hit[first][close]]
    return out


def country_names() -> list[str]:
    return _shapes().names


def country_codes() -> list[str | None]:
    return _shapes().codes


def countries_of(lat, lon) -> list[dict[str, str | None] | None]:
    """{code, name} per point, None at sea (or for a missing coordinate)."""
    idx = country_index(lat, lon)
    names, codes = country_names(), country_codes()
    return [None if i < 0 else {"code": codes[i], "name": names[i]} for i in idx.tolist()]
