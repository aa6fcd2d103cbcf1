"""Predictions as a GeoJSON FeatureCollection (RFC 7946) that QGIS, kepler.gl and geojson.io open as they are.

Built from the predictions frame (:mod:`geo.store.predictions`), so ``geo query
--format geojson`` and ``geo bench --out preds.geojson`` write the same thing.
Every property is a scalar, because GIS tools turn nested objects into opaque
text: one Feature per answer (``role: answer``), one per alternative
(``role: alternative``, its ``rank`` and ``score``) and, where the truth is known,
one for the truth (``role: truth``, with the answer's ``error_km``), and one MultiPolygon for the answer's region
(``role: region``: its stated ``coverage``, ``area_km2``, posterior ``mass``, number of ``cells``). A photo
that could not be located keeps its Feature with a null geometry and its
``error``, so counting features still counts every photo. Coordinates are
[longitude, latitude], as the RFC orders them.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geo.store.atomic import atomic_write_bytes

if TYPE_CHECKING:
    import pandas as pd

_RADII = ("1", "25", "200", "750", "2500")


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) or math.isinf(f) else f


def _text(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def _point(lat: Any, lon: Any) -> dict[str, Any] | None:
    la, lo = _num(lat), _num(lon)
    return None if la is None or lo is None else {"type": "Point", "coordinates": [lo, la]}


def _parsed(text: Any) -> Any:
    return json.loads(text) if isinstance(text, str) and text else None


def feature_collection(df: pd.DataFrame) -> dict[str, Any]:
    """The FeatureCollection for a predictions frame (rows in order)."""
    features: list[dict[str, Any]] = []
    for row in df.to_dict("records"):
        base = {"query_id": _text(row.get("query_id")), "path": _text(row.get("path")), "mode": _text(row.get("mode")),
                "trip": _text(row.get("trip"))}
        p_within = _parsed(row.get("p_within")) or {}
        answer = {**base, "role": "answer", "confidence": _num(row.get("confidence")),
                  "confidence_radius_km": _num(row.get("confidence_radius_km")),
                  **{f"p_within_{r}km": _num(p_within.get(r)) for r in _RADII},
                  "true_lat": _num(row.get("true_lat")), "true_lon": _num(row.get("true_lon")),
                  "error_km": _num(row.get("error_km")), "error": _text(row.get("error"))}
        features.append({"type": "Feature", "geometry": _point(row.get("pred_lat"), row.get("pred_lon")),
                         "properties": answer})
        for rank, alt in enumerate(_parsed(row.get("alternatives")) or [], start=1):
            features.append({"type": "Feature", "geometry": _point(alt.get("lat"), alt.get("lon")),
                             "properties": {**base, "role": "alternative", "rank": rank,
                                            "score": _num(alt.get("score"))}})
        region = _parsed(row.get("region"))
        if region and region.get("geometry"):
            features.append({"type": "Feature", "geometry": region["geometry"],
                             "properties": {**base, "role": "region", "coverage": _num(row.get("region_coverage")),
                                            "area_km2": _num(row.get("region_area_km2")),
                                            "mass": _num(row.get("region_mass")), "cells": len(region["cells"]),
                                            "calibrated": bool(region.get("calibrated"))}})
        truth = _point(row.get("true_lat"), row.get("true_lon"))
        if truth is not None:
            features.append({"type": "Feature", "geometry": truth,
                             "properties": {**base, "role": "truth", "error_km": _num(row.get("error_km"))}})
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | os.PathLike, df: pd.DataFrame) -> Path:
    """Write the FeatureCollection atomically."""
    return atomic_write_bytes(path, json.dumps(feature_collection(df), allow_nan=False).encode())
