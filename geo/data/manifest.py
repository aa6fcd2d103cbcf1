"""Manifests: which photos to index and where they were taken.

Accepted forms (see :func:`read_manifest`):

* CSV or Parquet with an image column and coordinates. Headers are matched
  case-insensitively, so the published formats load as they are: Im2GPS3k /
  YFCC (``IMG_ID, LAT, LON``), OSV-5M (``id, latitude, longitude``, image file
  ``<id>.jpg``, an unnamed pandas index column that is dropped).
* A folder of photos whose EXIF carries GPS.

Bad rows never stop a build: they come back as error rows (one per row, with
the row number and reason) for ``errors.parquet``. Only a manifest that
cannot be used at all raises :class:`ManifestError`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from geo.core.files import FileRefused, printable, regular_size
from geo.core.geodesy import valid_latlon
from geo.core.names import find_column
from geo.data.columns import ID_COLUMNS, LAT_COLUMNS, LON_COLUMNS, PATH_COLUMNS, as_text
from geo.data.images import IMAGE_EXTENSIONS

if TYPE_CHECKING:
    import pandas as pd

_UNNAMED = re.compile(r"^Unnamed: \d+$")  # pandas' name for a CSV's header-less index column
_GPS_IFD = 0x8825


class ManifestError(ValueError):
    """A manifest that cannot be used at all; the message names the file and the reason."""


@dataclass
class ManifestResult:
    df: pd.DataFrame  # id (str, unique), path (str), lat, lon (float64), then the input's extra columns
    errors: list[dict] = field(default_factory=list)  # {"path", "stage": "manifest", "reason"}
    source: str = ""


def read_manifest(source: str | os.PathLike, image_root: str | os.PathLike | None = None) -> ManifestResult:
    """Read a CSV/Parquet manifest or a folder of GPS-tagged photos.

    Relative image paths are joined to ``image_root``, or to the manifest's
    own folder when it is not given. An image value without an extension
    (OSV-5M ids) resolves to ``<value>.jpg`` when only that file exists.
    Row numbers in error reasons count data rows from 1.
    """
    src = Path(source)
    if src.is_dir():
        return _read_exif_folder(src)
    table = _read_table(src)
    return _normalise_table(table, src, Path(image_root) if image_root is not None else src.parent)


# ---------------------------------------------------------------- tables
def _read_table(src: Path) -> pd.DataFrame:
    import pandas as pd

    if not src.exists():
        raise ManifestError(f"{src}: manifest not found")
    try:
        regular_size(src)  # a FIFO or device would block or never end; a huge file is refused before reading
    except FileRefused as e:
        raise ManifestError(f"{src}: {e.reason}") from None
    try:
        if src.suffix.lower() in (".parquet", ".pq"):
            df = pd.read_parquet(src)
        else:
            header = pd.read_csv(src, nrows=0).columns
            text_cols = {c: str for c in header if str(c).lower() in ID_COLUMNS + PATH_COLUMNS}
            df = pd.read_csv(src, dtype=text_cols, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        raise ManifestError(f"{src}: empty manifest") from None
    except Exception as e:
        raise ManifestError(f"{src}: cannot read as {'Parquet' if src.suffix.lower() in ('.parquet', '.pq') else 'CSV'}"
                            f" ({type(e).__name__}: {e})") from None
    if df.empty:
        raise ManifestError(f"{src}: manifest has no rows")
    return df.loc[:, [c for c in df.columns if not _UNNAMED.match(str(c))]]


def _degrees(df: pd.DataFrame, chosen: str, aliases: tuple[str, ...], src: Path) -> np.ndarray:
    """The coordinate column ``find_column`` chose (the first alias in priority order), as float64 degrees.

    True/false is not a coordinate (pandas would read it as 1.0/0.0), and when another column also names
    this coordinate (``lat`` and ``latitude``) the two must agree: the rule that picks one is not allowed
    to hide a disagreement.
    """
    import pandas as pd

    col = df[chosen]
    if pd.api.types.is_bool_dtype(col) or any(isinstance(v, (bool, np.bool_)) for v in col.head(1000)):
        raise ManifestError(f"{src}: column {chosen!r} holds true/false values, not degrees")
    values = pd.to_numeric(col, errors="coerce").to_numpy(np.float64)
    lowered = {a.lower() for a in aliases}
    for other in (str(c) for c in df.columns if str(c).lower() in lowered and str(c) != str(chosen)):
        theirs = pd.to_numeric(df[other], errors="coerce").to_numpy(np.float64)
        both = np.isfinite(values) & np.isfinite(theirs)
        differ = np.flatnonzero(both & (np.abs(values - theirs) > 1e-6))
        if differ.size:
            i = int(differ[0])
            raise ManifestError(f"{src}: columns {chosen!r} and {other!r} both give this coordinate and disagree "
                                f"at {differ.size} rows (row {i + 1}: {values[i]:g} vs {theirs[i]:g}); keep one")
    return values


def _normalise_table(df: pd.DataFrame, src: Path, root: Path) -> ManifestResult:
    import pandas as pd

    cols = list(df.columns)
    id_col, path_col = find_column(cols, ID_COLUMNS), find_column(cols, PATH_COLUMNS)
    lat_col, lon_col = find_column(cols, LAT_COLUMNS), find_column(cols, LON_COLUMNS)
    missing = [what for what, c in (("image (path/image/IMG_ID/id)", path_col or id_col),
                                    ("latitude (lat/LAT/latitude)", lat_col),
                                    ("longitude (lon/LON/lng/longitude)", lon_col)) if c is None]
    if missing:
        raise ManifestError(f"{src}: no {', '.join(missing)} column; it has {[str(c) for c in cols]}")
    ids = as_text(df[id_col or path_col].tolist())
    images = as_text(df[path_col or id_col].tolist())
    lat = _degrees(df, lat_col, LAT_COLUMNS, src)
    lon = _degrees(df, lon_col, LON_COLUMNS, src)
    ok = valid_latlon(lat, lon)
    errors: list[dict] = []
    keep = np.zeros(len(df), dtype=bool)
    paths: list[str] = [""] * len(df)
    root_abs = os.path.abspath(root)
    first_row: dict[str, int] = {}
    first_file: dict[str, int] = {}
    for i in range(len(df)):
        img, ident = images[i], ids[i]
        if img is None or ident is None:
            errors.append(_error(img or "", f"row {i + 1}: no image {'id' if ident is None else 'path'}"))
            continue
        paths[i] = _resolve(img, root_abs)
        if not ok[i]:
            errors.append(_error(paths[i], f"row {i + 1}: {_coord_problem(df[lat_col].iloc[i], df[lon_col].iloc[i])}"))
        elif ident in first_row:
            errors.append(_error(paths[i], f"row {i + 1}: duplicate id {ident!r} (first at row {first_row[ident] + 1})"))
        elif (real := os.path.realpath(paths[i])) in first_file:
            errors.append(_error(paths[i], f"row {i + 1}: the same file as row {first_file[real] + 1} "
                                           f"({paths[first_file[real]]})"))
        else:
            first_row[ident] = i
            first_file[real] = i
            keep[i] = True
    extras = [c for c in cols if c not in (id_col, path_col, lat_col, lon_col)]
    out = pd.DataFrame({
        "id": pd.Series([ids[i] for i in np.flatnonzero(keep)], dtype=object),
        "path": pd.Series([paths[i] for i in np.flatnonzero(keep)], dtype=object),
        "lat": lat[keep], "lon": lon[keep],
    })
    for c in extras:
        out[str(c)] = df[c].to_numpy()[keep]
    return ManifestResult(out, errors, str(src))


def _resolve(value: str, root: str) -> str:
    """Absolute path without touching the disk, except to try ``.jpg`` on extension-less values."""
    p = os.path.normpath(os.path.join(root, os.path.expanduser(value)))
    if not os.path.splitext(p)[1] and not os.path.exists(p) and os.path.exists(p + ".jpg"):
        p += ".jpg"
    return p


def _coord_problem(lat: Any, lon: Any) -> str:
    import pandas as pd

    for name, v, lim in (("latitude", lat, 90), ("longitude", lon, 180)):
        f = pd.to_numeric(pd.Series([v]), errors="coerce").iloc[0]
        if not np.isfinite(f):
            return f"{name} {v!r} is not a finite number"
        if abs(f) > lim:
            return f"{name} {f} out of range [-{lim}, {lim}]"
    return "invalid coordinates"


def _error(path: str, reason: str) -> dict:
    return {"path": path, "stage": "manifest", "reason": reason}


# ---------------------------------------------------------------- EXIF folders
def _read_exif_folder(folder: Path) -> ManifestResult:
    """Every image below ``folder`` with EXIF GPS. A file reached twice (symlinks) is indexed once; a name
    that is not UTF-8 is kept with its bytes escaped (:func:`~geo.core.files.printable`)."""
    import pandas as pd

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ManifestError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder or below")
    rows, errors = [], []
    first: dict[str, str] = {}
    for p in files:
        real, shown = os.path.realpath(p), printable(p.absolute())
        if real in first:
            errors.append(_error(shown, f"the same file as {first[real]}"))
            continue
        first[real] = shown
        try:
            lat, lon = exif_latlon(p)
        except (ValueError, OSError) as e:
            errors.append(_error(shown, str(e)))
            continue
        if not valid_latlon(lat, lon):
            errors.append(_error(shown, f"EXIF GPS {lat}, {lon} out of range"))
            continue
        rows.append({"id": printable(p.relative_to(folder).as_posix()), "path": shown, "lat": lat, "lon": lon})
    df = pd.DataFrame(rows, columns=["id", "path", "lat", "lon"]).astype({"lat": np.float64, "lon": np.float64})
    return ManifestResult(df, errors, str(folder))


def exif_latlon(path: str | os.PathLike) -> tuple[float, float]:
    """Decimal degrees from a photo's EXIF GPS block; ValueError 'no GPS in EXIF' when absent."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            gps = im.getexif().get_ifd(_GPS_IFD)
    except UnidentifiedImageError:
        raise ValueError("not an image (unrecognised format)") from None
    except Exception as e:
        raise ValueError(f"unreadable EXIF ({type(e).__name__}: {e})") from None
    if not gps or 2 not in gps or 4 not in gps:
        raise ValueError("no GPS in EXIF")
    try:
        lat = _signed(_dms(gps[2]), gps.get(1), "NS", "GPSLatitudeRef")
        lon = _signed(_dms(gps[4]), gps.get(3), "EW", "GPSLongitudeRef")
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise ValueError(f"malformed EXIF GPS ({e})") from None
    if lat == 0 and lon == 0:
        raise ValueError("EXIF GPS 0, 0 (\"null island\"): a camera's default when it had no fix, not a place")
    return lat, lon


def _signed(dms: tuple[float, bool], ref: Any, refs: str, tag: str) -> float:
    """Apply the reference (N/S, E/W: the EXIF spec's sign); a negative degrees field some writers use instead
    of the reference also means south or west, never both at once. Without either, the hemisphere is unknown:
    reading it as N or E would put a southern or western photo on the wrong side of the globe."""
    magnitude, negative = dms
    if ref is None and not negative and magnitude != 0:
        raise ValueError(f"{tag} missing: cannot tell {refs[0]} from {refs[1]}")
    if ref is not None:
        r = (ref.decode("ascii", "replace") if isinstance(ref, bytes) else str(ref)).strip("\x00 ").upper()
        if r not in refs:
            raise ValueError(f"{tag} {r!r} is not {refs[0]} or {refs[1]}")
        negative = negative or r == refs[1]
    return -magnitude if negative else magnitude


def _dms(value: Any) -> tuple[float, bool]:
    """(magnitude in degrees, negative) from (degrees, minutes, seconds) rationals; a bare number is degrees.

    Minutes and seconds must lie in [0, 60): the spec's unsigned rationals. A negative degrees field
    negates the whole value (-45 30' is -45.5, not -44.5).
    """
    parts = [float(v) for v in (value if isinstance(value, (tuple, list)) else (value,))][:3]
    if not parts or any(not np.isfinite(v) for v in parts):
        raise ValueError(f"non-finite or empty DMS {value!r}")
    for name, v in zip(("minutes", "seconds"), parts[1:]):
        if not 0 <= v < 60:
            raise ValueError(f"{name} {v:g} outside [0, 60)")
    return abs(parts[0]) + sum(v / 60.0**k for k, v in enumerate(parts[1:], start=1)), parts[0] < 0
