"""The column names geo recognises in manifests, embedding tables, suite metadata and predictions files.

One table, matched case-insensitively, so the published formats load as they
are: Im2GPS3k / YFCC (``IMG_ID, AUTHOR, LAT, LON``), OSV-5M (``id, latitude,
longitude``), clip-retrieval metadata, GeoEstimation result files.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

ID_COLUMNS = ("id",)
PATH_COLUMNS = ("path", "image", "img_id", "image_path", "image_id", "filename", "file")
LAT_COLUMNS = ("lat", "latitude")
LON_COLUMNS = ("lon", "lng", "longitude")
GROUP_COLUMNS = ("author", "owner", "user", "photographer")  # whole groups are held out together: photographers


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


def find_column(columns: Iterable, candidates: tuple[str, ...]) -> str | None:
    """The first column matching the candidates in priority order, case-insensitively; an exact-case match wins a tie."""
    columns = [str(c) for c in columns]
    for cand in candidates:
        hits = [c for c in columns if c.lower() == cand.lower()]
        if hits:
            return cand if cand in hits else hits[0]
    return None
