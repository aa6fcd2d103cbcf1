"""Which country a coordinate lies in, offline: Natural Earth's 1:50m country shapes (the ``world-atlas``
npm package geo already vendors for its map page), tested point by point.

Why shapes and not the nearest city: near a border the nearest GeoNames place is often across it, and a
point at sea has a nearest city too. Truth and prediction go through the same function, so country
accuracy in ``geo bench`` and ``geo report`` compares like with like. Codes are ISO 3166-1 numeric (what
the shapes carry); a handful of disputed areas have a name and no code. A point in no shape (the sea) has
no country.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Vendored once for the map page (geo/serve/static/vendor, with its licence); this module only reads it.
SHAPES = Path(__file__).resolve().parents[1] / "serve" / "static" / "vendor" / "countries-50m.json"
CHUNK = 200_000  # points per pass: the even-odd counts are [points, countries] int8


@dataclass(frozen=True)
class _Ring:
    country: int  # index into _Shapes.names
    box: tuple[float, float, float, float]  # lon_min, lat_min, lon_max, lat_max
    lon: np.ndarray
    lat: np.ndarray


@dataclass(frozen=True)
class _Shapes:
    names: list[str]
    codes: list[str | None]
    rings: list[_Ring]


def _decode_arcs(topo: dict) -> list[np.ndarray]:
    """TopoJSON's quantised, delta-encoded arcs -> [k, 2] lon/lat arrays (one cumulative sum over all of them,
    restarted at each arc: a loop of 2,000 small cumsums cost a cold query 0.2 s)."""
    scale, shift = np.array(topo["transform"]["scale"]), np.array(topo["transform"]["translate"])
    lengths = np.fromiter((len(a) for a in topo["arcs"]), np.int64, len(topo["arcs"]))
    flat = np.array([p for a in topo["arcs"] for p in a], np.float64)
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


def _crosses_antimeridian(xy: np.ndarray) -> bool:
    """A jump of more than 180 degrees between neighbours, other than along a pole (Antarctica's ring runs
    from -180 to 180 and comes back along latitude -90, a true edge in the plane)."""
    jump = np.abs(np.diff(xy[:, 0])) > 180
    polar = (np.abs(xy[:-1, 1]) > 89.9) & (np.abs(xy[1:, 1]) > 89.9)
    return bool((jump & ~polar).any())


@functools.cache
def _shapes() -> _Shapes:
    topo = json.loads(SHAPES.read_text())
    arcs = _decode_arcs(topo)
    names, codes, rings = [], [], []
    for g in topo["objects"]["countries"]["geometries"]:
        polygons = {"Polygon": [g.get("arcs", [])], "MultiPolygon": g.get("arcs", [])}.get(g["type"], [])
        if not polygons:
            continue
        names.append(g.get("properties", {}).get("name", "?"))
        codes.append(str(g["id"]) if g.get("id") is not None else None)
        for polygon in polygons:
            for refs in polygon:
                xy = _ring(arcs, refs)
                if _crosses_antimeridian(xy):  # make it continuous (longitudes past 180)
                    xy[:, 0] = np.rad2deg(np.unwrap(np.deg2rad(xy[:, 0])))
                rings.append(_Ring(len(names) - 1, (xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(),
                                                          xy[:, 1].max()), xy[:, 0], xy[:, 1]))
    return _Shapes(names, codes, rings)


def _inside(ring: _Ring, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Even-odd ray casting of many points against one ring (its vertices closed on themselves); rings that
    cross the antimeridian are stored unwrapped (longitudes past 180), see :func:`country_index`."""
    x0, y0 = ring.lon, ring.lat
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    crosses = (y0[None, :] > lat[:, None]) != (y1[None, :] > lat[:, None])
    with np.errstate(divide="ignore", invalid="ignore"):
        at = x0[None, :] + (lat[:, None] - y0[None, :]) * (x1 - x0)[None, :] / (y1 - y0)[None, :]
    return (crosses & (lon[:, None] < at)).sum(axis=1) % 2 == 1


def country_index(lat, lon) -> np.ndarray:
    """For each point, the index of its country in :func:`country_names` (-1: in none, i.e. at sea).

    Points are tested against each ring whose bounding box holds them, even-odd over all of a country's
    rings: inside an outer ring and not in its hole. (Which ring of a polygon is outer cannot be read from
    the order: in the spherical TopoJSON, Antarctica's coastline comes second, after a sliver at the pole.)
    In chunks of :data:`CHUNK` points, so a gallery of millions fits in memory."""
    lat = np.atleast_1d(np.asarray(lat, np.float64))
    lon = np.atleast_1d(np.asarray(lon, np.float64))
    if len(lat) <= CHUNK:
        return _country_index(lat, lon)
    return np.concatenate([_country_index(lat[s:s + CHUNK], lon[s:s + CHUNK]) for s in range(0, len(lat), CHUNK)])


def _country_index(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    shapes = _shapes()
    inside = np.zeros((len(lat), len(shapes.names)), np.int8)
    ok = np.isfinite(lat) & np.isfinite(lon)
    for ring in shapes.rings:
        x0, y0, x1, y1 = ring.box
        for shift in (0.0, 360.0, -360.0):  # an unwrapped ring may reach past +-180: try the point a turn away
            if shift and not (x1 > 180 if shift > 0 else x0 < -180):
                continue
            x = lon + shift
            cand = np.flatnonzero(ok & (x >= x0) & (x <= x1) & (lat >= y0) & (lat <= y1))
            if cand.size:
                inside[cand[_inside(ring, x[cand], lat[cand])], ring.country] += 1
    odd = inside % 2 == 1
    return np.where(odd.any(axis=1), odd.argmax(axis=1), -1)


def country_names() -> list[str]:
    return _shapes().names


def country_codes() -> list[str | None]:
    return _shapes().codes


def countries_of(lat, lon) -> list[dict[str, str | None] | None]:
    """{code, name} per point, None at sea (or for a missing coordinate)."""
    idx = country_index(lat, lon)
    names, codes = country_names(), country_codes()
    return [None if i < 0 else {"code": codes[i], "name": names[i]} for i in idx.tolist()]


def country_rings(country: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(lon, lat) of each ring of one country (an index into :func:`country_names`), as :func:`country_index`
    tests them: even-odd over all of them; a ring across the antimeridian is unwrapped (longitudes past 180)."""
    return [(r.lon, r.lat) for r in _shapes().rings if r.country == country]
