"""Benchmark suites: where each one's ground truth lives and how to read its real metadata format.

Every reader returns the same frame: ``query_id`` (str), ``rel_path`` (the
image's path under ``--images``), ``true_lat``, ``true_lon`` (float64),
``scene`` and ``country`` (str or None). The formats are the published ones,
not a normalised copy, so a user can point ``--meta`` at the file they
downloaded:

- GeoEstimation (Im2GPS, Im2GPS3k, YFCC26k): ``IMG_ID,AUTHOR,LAT,LON,S3_Label,...``
- YFCC4k (G3's release): mostly unnamed columns; ``IMG_ID``, ``LAT``, ``LON`` named
- OSV-5M: ``id,longitude,latitude,city,region,country`` (image ``<id>.jpg``)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from geo.core.geodesy import valid_latlon
from geo.core.names import find_column
from geo.core.splits import group_column
from geo.data.columns import ID_COLUMNS, LAT_COLUMNS, LON_COLUMNS, PATH_COLUMNS
from geo.data.images import IMAGE_EXTENSIONS

if TYPE_CHECKING:
    import pandas as pd

S3_SCENES = {0: "indoor", 1: "natural", 2: "urban"}


class SuiteError(ValueError):
    """Suite metadata or images that cannot be used; the message names the file and reason."""


def shared_data_dir() -> Path:
    """``$GEO_SHARED_DATA``, else ``../shared/data`` beside the checkout."""
    env = os.environ.get("GEO_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def _read_csv(path: Path, **kwargs) -> pd.DataFrame:
    import pandas as pd

    try:
        return pd.read_csv(path, **kwargs)
    except FileNotFoundError:
        raise SuiteError(f"{path}: metadata file not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise SuiteError(f"{path}: not a readable CSV ({e})") from None


def _need(df: pd.DataFrame, cols: list[str], path: Path, fmt: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise SuiteError(f"{path}: not in the {fmt} format (missing columns {', '.join(missing)}; has {', '.join(map(str, df.columns[:12]))})")


def _frame(path: Path, ids, rel, lat, lon, scene=None, country=None, photographer=None) -> pd.DataFrame:
    import pandas as pd

    n = len(ids)
    df = pd.DataFrame(
        {
            "query_id": pd.Series(ids).astype(str).to_numpy(),
            "rel_path": pd.Series(rel).astype(str).to_numpy(),
            "true_lat": pd.to_numeric(pd.Series(lat), errors="coerce").to_numpy(np.float64),
            "true_lon": pd.to_numeric(pd.Series(lon), errors="coerce").to_numpy(np.float64),
            "scene": [None] * n if scene is None else list(scene),
            "country": [None] * n if country is None else [None if pd.isna(c) else str(c) for c in country],
            "photographer": [None] * n if photographer is None else [None if pd.isna(a) else str(a)
                                                                     for a in photographer],
        }
    )
    bad = np.flatnonzero(~valid_latlon(df["true_lat"], df["true_lon"]))
    if bad.size:
        rows = ", ".join(f"line {i + 2} ({df['query_id'][i]})" for i in bad[:10])
        more = f" and {bad.size - 10} more" if bad.size > 10 else ""
        raise SuiteError(f"{path}: missing, non-numeric or out-of-range coordinates at {rows}{more}")
    dup = df["query_id"].duplicated()
    if dup.any():
        raise SuiteError(f"{path}: duplicate image ids {', '.join(df['query_id'][dup].head(5))}")
    return df


def read_geoestimation(path: Path) -> pd.DataFrame:
    import pandas as pd

    df = _read_csv(path, dtype={"IMG_ID": str})
    _need(df, ["IMG_ID", "LAT", "LON"], path, "GeoEstimation (IMG_ID,AUTHOR,LAT,LON,S3_Label,...)")
    scene = None
    if "S3_Label" in df.columns:
        s3 = pd.to_numeric(df["S3_Label"], errors="coerce")
        scene = [S3_SCENES.get(int(x)) if pd.notna(x) else None for x in s3]
    return _frame(path, df["IMG_ID"], df["IMG_ID"], df["LAT"], df["LON"], scene=scene, photographer=df.get("AUTHOR"))


def read_yfcc4k(path: Path) -> pd.DataFrame:
    df = _read_csv(path, dtype={"IMG_ID": str})
    _need(df, ["IMG_ID", "LAT", "LON"], path, "YFCC4k (unnamed columns with IMG_ID, LAT, LON named)")
    return _frame(path, df["IMG_ID"], df["IMG_ID"], df["LAT"], df["LON"])


def read_osv5m(path: Path) -> pd.DataFrame:
    df = _read_csv(path, dtype={"id": str})
    _need(df, ["id", "latitude", "longitude"], path, "OSV-5M (id,longitude,latitude,...,country)")
    country = df["country"] if "country" in df.columns else None
    return _frame(path, df["id"], df["id"] + ".jpg", df["latitude"], df["longitude"], country=country)




def read_custom(path: Path) -> pd.DataFrame:
    """Any manifest: the GeoEstimation format, or a CSV with an id/path and lat/lon columns."""
    import pandas as pd

    head = _read_csv(path, nrows=0)
    if {"IMG_ID", "LAT", "LON"} <= set(head.columns):
        return read_geoestimation(path)
    cimg = find_column(head.columns, PATH_COLUMNS) or find_column(head.columns, ID_COLUMNS)
    cid = find_column(head.columns, ID_COLUMNS) or cimg
    clat, clon = find_column(head.columns, LAT_COLUMNS), find_column(head.columns, LON_COLUMNS)
    if not (cid and clat and clon):
        raise SuiteError(
            f"{path}: cannot find an image and coordinates (want one of {'/'.join(PATH_COLUMNS + ID_COLUMNS)}, "
            f"{'/'.join(LAT_COLUMNS)}, {'/'.join(LON_COLUMNS)}, any case; has {', '.join(head.columns[:12])})"
        )
    df = _read_csv(path, dtype={cid: str, cimg: str})
    scene = None
    if "S3_Label" in df.columns:
        scene = [S3_SCENES.get(int(x)) if pd.notna(x) else None for x in pd.to_numeric(df["S3_Label"], errors="coerce")]
    country = df["country"] if "country" in df.columns else None
    cgroup = group_column(df.columns)
    return _frame(path, df[cid], df[cimg], df[clat], df[clon], scene=scene, country=country,
                  photographer=df[cgroup] if cgroup else None)


@dataclass(frozen=True)
class Suite:
    """A benchmark: its reader, and the metadata file names it is published under."""

    name: str
    title: str
    reader: Callable[[Path], pd.DataFrame]
    meta_names: tuple[str, ...] = ()  # looked for beside --images first, then under shared data
    shared_meta: str | None = None  # default location relative to shared_data_dir()

    def find_meta(self, images: Path, meta: Path | None = None) -> Path:
        """The metadata file to use: ``--meta``; else one beside the images; else the shared copy.

        Looking beside the images first means the im2gps3k dev sample (671
        photos with their own CSV) is scored on its 671 rows, not reported as
        2,326 missing photos of the full set.
        """
        if meta is not None:
            return Path(meta)
        for d in (images, images.parent):
            for name in self.meta_names:
                if (d / name).is_file():
                    return d / name
        if self.shared_meta and (shared_data_dir() / self.shared_meta).is_file():
            return shared_data_dir() / self.shared_meta
        raise SuiteError(f"{self.name}: no metadata file given and none found beside {images}; pass --meta CSV")

    def load(self, images: Path, meta: Path | None = None) -> tuple[pd.DataFrame, Path]:
        path = self.find_meta(images, meta)
        df = self.reader(path)
        if df.empty:
            raise SuiteError(f"{path}: no rows")
        return df, path


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite("im2gps", "Im2GPS (Hays & Efros 2008), 237 photos", read_geoestimation,
              ("im2gps_places365.csv",), "geoestimation/meta/im2gps_places365.csv"),
        Suite("im2gps3k", "Im2GPS3k (Vo et al. 2017), 2,997 photos", read_geoestimation,
              ("im2gps3k_places365.csv",), "geoestimation/meta/im2gps3k_places365.csv"),
        Suite("yfcc4k", "YFCC4k (Vo et al. 2017), 4,536 photos", read_yfcc4k,
              ("yfcc4k_places365_G3.csv", "yfcc4k_places365.csv"), "yfcc/yfcc4k_places365_G3.csv"),
        Suite("yfcc26k", "YFCC26k / YFCC-Val26k (Müller-Budack et al. 2018), 25,600 photos", read_geoestimation,
              ("yfcc25600_places365.csv",), "yfcc/yfcc25600_places365.csv"),
        Suite("osv5m", "OpenStreetView-5M test set (Astruc et al. 2024)", read_osv5m,
              ("osv5m_sample.csv", "test.csv"), "osv5m-sample/osv5m_sample.csv"),
        Suite("custom", "any manifest (GeoEstimation CSV, or id + lat/lon columns)", read_custom),
    )
}


def get_suite(name: str) -> Suite:
    try:
        return SUITES[name]
    except KeyError:
        raise SuiteError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)}") from None


def resolve_images(df: pd.DataFrame, images: Path) -> pd.Series:
    """Absolute image path per row, or None where the photo is not on disk.

    A suite pointed at a folder with no images at all is an error (a wrong
    ``--images`` would otherwise read as 100 % missing); a partial download
    is not, and is reported by the caller.
    """
    images = Path(images)
    if not images.is_dir():
        raise SuiteError(f"{images}: no such images directory")
    present = {p.name for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
    nested = any(p.is_dir() for p in images.iterdir())
    if not present and not nested:
        raise SuiteError(f"{images}: the folder holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")

    def one(rel: str) -> str | None:
        p = images / rel
        if p.is_file():
            return str(p)
        base = Path(rel).name  # datasets re-downloaded flat (YFCC26k ids are aa/bb/name.jpg)
        return str(images / base) if base in present else None

    paths = df["rel_path"].map(one)
    if paths.isna().all():
        raise SuiteError(
            f"{images}: none of the {len(df)} images of the metadata are in this folder "
            f"(first expected: {df['rel_path'].iloc[0]})"
        )
    return paths
