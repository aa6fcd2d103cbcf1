"""When a photo was taken, in hours, for locating a trip's photos together (:mod:`geo.query.trip`).

Two sources: a photo's EXIF ``DateTimeOriginal`` (``DateTime`` when the camera wrote no original), and a
time column of a table (``taken``, ``time``, ``timestamp``, ``datetime``, ``date_taken``,
``DateTimeOriginal``: text or datetimes, or numbers read as Unix seconds). EXIF times carry no time zone;
they are read as UTC, so a trip that crosses time zones gets legs a few hours off, which the travel
model's slack and speed absorb. A time that is missing or cannot be read is NaN: that photo is answered
alone, and its answer says why.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Sequence

import numpy as np

from geo.core.names import find_column

if TYPE_CHECKING:
    import pandas as pd

TIME_COLUMNS = ("taken", "time", "timestamp", "datetime", "date_taken", "DateTimeOriginal")
TRIP_COLUMNS = ("trip", "trip_id")
_EXIF_IFD = 0x8769
_DATETIME_ORIGINAL = 0x9003
_DATETIME = 0x0132
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def exif_hours(path: str | os.PathLike) -> float:
    """Hours since 1970 at which the photo was taken (EXIF DateTimeOriginal, else DateTime); NaN without one."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            exif = im.getexif()
            raw = exif.get_ifd(_EXIF_IFD).get(_DATETIME_ORIGINAL) or exif.get(_DATETIME)
    except Exception:  # an unreadable file is the image reader's error to report; here it just has no time
        return float("nan")
    return _exif_text_hours(raw)


def _exif_text_hours(raw: object) -> float:
    """EXIF's "YYYY:MM:DD HH:MM:SS" as hours since 1970 (UTC); NaN for blank, zeroed or malformed text."""
    text = (raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw or "")).strip("\x00 ")
    try:
        when = datetime.strptime(text[:19], "%Y:%m:%d %H:%M:%S").replace(tzinfo=timezone.utc)
    except ValueError:
        return float("nan")
    return (when - _EPOCH).total_seconds() / 3600.0


def photo_hours(paths: Sequence[str]) -> np.ndarray:
    """[len(paths)] hours since 1970 from each photo's EXIF (NaN where it has none)."""
    return np.array([exif_hours(p) for p in paths], np.float64)


def time_column(columns: Sequence[str]) -> str | None:
    """The table's time column, by :data:`TIME_COLUMNS`."""
    return find_column(columns, TIME_COLUMNS)


def column_hours(values: pd.Series) -> np.ndarray:
    """A time column as hours since 1970: numbers are Unix seconds, anything else is parsed as a date and
    time (naive ones read as UTC); NaN where a value is missing or cannot be read."""
    import pandas as pd

    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return pd.to_numeric(values, errors="coerce").to_numpy(np.float64) / 3600.0
    when = pd.to_datetime(values, errors="coerce", utc=True, format="mixed")
    seconds = (when - pd.Timestamp(_EPOCH)).dt.total_seconds()
    return seconds.to_numpy(np.float64) / 3600.0
