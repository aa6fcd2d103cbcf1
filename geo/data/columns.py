"""The column names geo recognises in manifests, embedding tables, suite metadata and predictions files.

One table, matched case-insensitively, so the published formats load as they
are: Im2GPS3k / YFCC (``IMG_ID, AUTHOR, LAT, LON``), OSV-5M (``id, latitude,
longitude``), clip-retrieval metadata, GeoEstimation result files. A column is picked from a table with
``geo.core.names.find_column``; the photographers' aliases are ``geo.core.splits.GROUP_COLUMNS``, beside the
split that holds whole photographers out (core cannot import this module).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

ID_COLUMNS = ("id",)
PATH_COLUMNS = ("path", "image", "img_id", "image_path", "image_id", "filename", "file")
LAT_COLUMNS = ("lat", "latitude")
LON_COLUMNS = ("lon", "lng", "longitude")


def as_text(values: Iterable) -> list[str | None]:
    """Id or path values as stripped strings; NaN/empty -> None; 12.0-style floats from Parquet -> '12'."""
    out: list[str | None] = []
    for v in values:
        if v is None or (isinstance(v, float) and not np.isfinite(v)):
            out.append(None)
            continue
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        out.append(str(v).strip() or None)
    return out
