"""Predictions files: one Parquet schema shared by ``geo query --out`` and ``geo bench --out``.

One schema means a query run and a benchmark run can be scored, queried with
``geo sql`` and reported with ``geo report`` by the same code.

Schema (one row per query image; nullable unless noted)::

    query_id    string     not null; unique within a file (the suite's image id, or the path for ad-hoc queries)
    path        string     image path as given to the index
    true_lat    float64    ground truth in degrees (null for ad-hoc queries)
    true_lon    float64
    pred_lat    float64    the answer (null when the image could not be read)
    pred_lon    float64
    mode        string     fused | knn | gallery | cells
    confidence  float64    0..1, as the index reported it
    error_km    float64    haversine (R = 6371.0 km) from truth to prediction; null without both
    top_cells   string     JSON list of {partition, token, prob, lat, lon, polygon}
    topk        string     JSON list of {id, path, lat, lon, similarity, distance_km} (the neighbours)
    suite       string     im2gps3k, osv5m, custom, ... or null
    index_id    string     which index answered (bundle directory and its creation time)
    created     timestamp[us, UTC]  when the row was written
    scene       string     indoor | natural | urban (GeoEstimation S3 label) where the suite has it
    country     string     ISO 3166 alpha-2 of the truth where the suite has it
    error       string     null, or why the image could not be located (then pred_* are null)
    confidence_radius_km float64  the radius ``confidence`` is stated for
    p_within    string     JSON {radius_km: probability} where the mode is calibrated
    alternatives string    JSON list of {lat, lon, score}: the other places the answer weighed
    photographer string    the query's photographer (AUTHOR / owner column) where the suite has it
    leak        string     why `geo bench` found the query not new to the gallery: same id | same file |
                           near-duplicate | same photographer; null when new (or not checked)
    true_country string    the country the truth lies in (Natural Earth shapes, geo.data.countries); null at sea
    pred_country string    the country the answer lies in, by the same shapes
    true_city   string     "name, admin1, cc" of the GeoNames place within 25 km of the truth (geo.data.places)
    pred_city   string     the same for the answer
    within      string     the query-time constraint the answer was kept inside (Answer.within: "country:PRT",
                           "box:S,W,N,E", "near:LAT,LON,Rkm", + " weight=W" when soft); null without one
    region_coverage float64  the coverage the answer's region was stated for (geo query --coverage; null without cells)
    region_area_km2 float64  its area
    region_mass float64    the calibrated posterior mass inside it
    region_hit  bool       whether the truth lies inside it (filled by `geo bench`, which knows the truth and the cells)
    region      string     JSON {calibrated, cells, geometry}: its tokens and GeoJSON MultiPolygon
    region_curve string    JSON list of {coverage, mass, area_km2, cells, hit} at 0.5 / 0.8 / 0.9 / 0.95: the
                           recall-vs-area table of `geo bench` and `geo report`
    trip        string     the trip the answer was located with (`geo query --trip`); null when located alone

Files written before the last columns existed read with them null (the two country columns are filled from
the coordinates, so any file gets country accuracy).

``top_cells`` and ``topk`` are JSON text rather than nested Arrow types so
that DuckDB, pandas and CSV export all read them without a schema dance
(``json_extract(topk, '$[0].lat')`` in ``geo sql``).

Long benchmarks write append-safe shards ``<out>.parts/part-NNNNN.parquet``
(each written atomically) and merge them into ``<out>`` at the end; a run
that is interrupted resumes by skipping the query ids found in ``<out>`` and
its shards.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from geo.core.answer import Answer
from geo.core.files import NO_CAP, FileRefused, regular_size
from geo.core.geodesy import haversine_km
from geo.core.names import find_column
from geo.data.countries import country_index, country_names
from geo.data.places import cities_of
from geo.data.columns import ID_COLUMNS, LAT_COLUMNS, LON_COLUMNS, PATH_COLUMNS
from geo.store.atomic import atomic_write_parquet

if TYPE_CHECKING:
    import pandas as pd

SCHEMA = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("path", pa.string()),
        pa.field("true_lat", pa.float64()),
        pa.field("true_lon", pa.float64()),
        pa.field("pred_lat", pa.float64()),
        pa.field("pred_lon", pa.float64()),
        pa.field("mode", pa.string()),
        pa.field("confidence", pa.float64()),
        pa.field("error_km", pa.float64()),
        pa.field("top_cells", pa.string()),
        pa.field("topk", pa.string()),
        pa.field("suite", pa.string()),
        pa.field("index_id", pa.string()),
        pa.field("created", pa.timestamp("us", tz="UTC")),
        pa.field("scene", pa.string()),
        pa.field("country", pa.string()),
        pa.field("error", pa.string()),
        pa.field("confidence_radius_km", pa.float64()),
        pa.field("p_within", pa.string()),
        pa.field("alternatives", pa.string()),
        pa.field("photographer", pa.string()),
        pa.field("leak", pa.string()),
        pa.field("true_country", pa.string()),
        pa.field("pred_country", pa.string()),
        pa.field("true_city", pa.string()),
        pa.field("pred_city", pa.string()),
        # the query-time constraint the answer was kept inside (Answer.within: "country:PRT", "box:S,W,N,E",
        # "near:LAT,LON,Rkm", + " weight=W" when soft); null without one
        pa.field("within", pa.string()),
        pa.field("region_coverage", pa.float64()),
        pa.field("region_area_km2", pa.float64()),
        pa.field("region_mass", pa.float64()),
        pa.field("region_hit", pa.bool_()),
        pa.field("region", pa.string()),
        pa.field("region_curve", pa.string()),
        pa.field("trip", pa.string()),
    ],
    metadata={"geo.store.predictions.version": "1"},
)
COLUMNS = SCHEMA.names
_FLOATS = ("true_lat", "true_lon", "pred_lat", "pred_lon", "confidence", "error_km", "confidence_radius_km",
           "region_coverage", "region_area_km2", "region_mass")


class PredictionsError(ValueError):
    """A predictions file that cannot be used; the message names the file and the reason."""


def _json_or_none(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return json.dumps(value, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))


def answers_to_frame(
    answers: Sequence[Answer | Mapping[str, Any]],
    query_ids: Sequence[str] | None = None,
    truth: Sequence[tuple[float, float]] | None = None,
    *,
    mode: str | None = None,
    suite: str | None = None,
    index_id: str | None = None,
    extra: Mapping[str, Sequence[Any]] | None = None,
) -> pd.DataFrame:
    """Rows in :data:`SCHEMA` from ``GeoIndex.locate`` answers (or their ``to_dict()``).

    ``truth`` (lat, lon per answer) is optional so that ``geo query --out``
    can write the same file without ground truth. ``extra`` fills the
    optional columns (``scene``, ``country``) per answer. The country columns are
    filled from the coordinates by :func:`conform`.
    """
    import pandas as pd

    answers = [a.to_dict() if isinstance(a, Answer) else a for a in answers]
    n = len(answers)
    ids = list(query_ids) if query_ids is not None else [
        str(a.get("image") if a.get("image") is not None else a.get("id")) for a in answers]
    if len(ids) != n or (truth is not None and len(truth) != n):
        raise ValueError(f"{n} answers but {len(ids)} query ids / {len(truth or [])} truths")
    failed = [bool(a.get("error")) for a in answers]
    df = pd.DataFrame(
        {
            "query_id": [str(i) for i in ids],
            "path": [None if a.get("image") is None else str(a.get("image")) for a in answers],
            "true_lat": [np.nan if truth is None else truth[i][0] for i in range(n)],
            "true_lon": [np.nan if truth is None else truth[i][1] for i in range(n)],
            "pred_lat": [np.nan if failed[i] else a.get("lat", np.nan) for i, a in enumerate(answers)],
            "pred_lon": [np.nan if failed[i] else a.get("lon", np.nan) for i, a in enumerate(answers)],
            "mode": [a.get("mode") or mode for a in answers],
            "confidence": [a.get("confidence", np.nan) for a in answers],
            "top_cells": [_json_or_none(a.get("top_cells")) for a in answers],
            "confidence_radius_km": [a.get("confidence_radius_km", np.nan) for a in answers],
            "p_within": [_json_or_none(a.get("p_within")) for a in answers],
            "alternatives": [_json_or_none(a.get("alternatives")) for a in answers],
            "topk": [_json_or_none(a.get("neighbors")) for a in answers],
            "suite": suite,
            "index_id": index_id,
            "created": pd.Timestamp(_dt.datetime.now(_dt.timezone.utc)),
            "error": [str(a["error"]) if failed[i] else None for i, a in enumerate(answers)],
            "within": [a.get("within") for a in answers],
            **_region_columns([a.get("region") or {} for a in answers]),
            "trip": [a.get("trip") for a in answers],
        }
    )
    for col, values in (extra or {}).items():
        df[col] = list(values)
    return conform(df)


def _region_columns(regions: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The region columns of answers' ``region`` dicts (empty: nulls)."""
    return {"region_coverage": [r.get("coverage", np.nan) for r in regions],
            "region_area_km2": [r.get("area_km2", np.nan) for r in regions],
            "region_mass": [r.get("mass", np.nan) for r in regions],
            "region": [_json_or_none({k: r[k] for k in ("calibrated", "cells", "geometry")}) if r else None
                       for r in regions],
            "region_curve": [_json_or_none(r.get("curve")) for r in regions]}


def conform(df: pd.DataFrame) -> pd.DataFrame:
    """Add missing optional columns, order them, coerce floats and recompute ``error_km``.

    ``error_km`` is recomputed here so that no file can carry a distance that
    disagrees with its own coordinates.
    """
    import pandas as pd

    df = df.copy()
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = None
    for col in _FLOATS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    df["error_km"] = haversine_km(df["true_lat"], df["true_lon"], df["pred_lat"], df["pred_lon"])
    for side in ("true", "pred"):  # from the coordinates wherever a row has them and no label yet
        todo = df[f"{side}_country"].isna().to_numpy() & df[f"{side}_lat"].notna().to_numpy()
        if todo.any():
            lat, lon = df.loc[todo, f"{side}_lat"], df.loc[todo, f"{side}_lon"]
            names = np.asarray(country_names() + [None], dtype=object)
            df.loc[todo, f"{side}_country"] = names[country_index(lat, lon)]
            df.loc[todo, f"{side}_city"] = cities_of(lat, lon)
    now = pd.Timestamp(_dt.datetime.now(_dt.timezone.utc))
    df["created"] = pd.to_datetime(df["created"], utc=True).astype("datetime64[us, UTC]").fillna(now)
    extras = [c for c in df.columns if c not in COLUMNS]
    return df[COLUMNS + extras]


def to_table(df: pd.DataFrame) -> pa.Table:
    """Arrow table in :data:`SCHEMA` order; extra columns are kept after the schema's own."""
    df = conform(df)
    base = pa.Table.from_pandas(df[COLUMNS], schema=SCHEMA, preserve_index=False)
    for col in df.columns[len(COLUMNS):]:
        base = base.append_column(col, pa.array(df[col].tolist()))
    return base.replace_schema_metadata(SCHEMA.metadata)


def write_predictions(path: str | os.PathLike, df: pd.DataFrame) -> Path:
    """Write one predictions file atomically (never a half-written file under the final name)."""
    return atomic_write_parquet(path, to_table(df))


def read_predictions(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> pd.DataFrame:
    """Read one or more predictions files (or directories of them) into one DataFrame."""
    import pandas as pd

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.glob("*.parquet")))
        elif p.exists():
            try:
                regular_size(p, cap=NO_CAP)
            except FileRefused as e:
                raise PredictionsError(f"{p}: {e.reason}") from None
            files.append(p)
        else:
            raise PredictionsError(f"{p}: no such predictions file")
    if not files:
        raise PredictionsError(f"{', '.join(map(str, paths))}: no .parquet predictions files found")
    frames = [_read_part(f) for f in files]
    return conform(pd.concat(frames, ignore_index=True))


def _read_part(f: Path) -> pd.DataFrame:
    """One predictions file, named in every refusal: in a folder, pyarrow's message alone does not say which part
    is damaged (undecodable text in a damaged part surfaces only at the conversion)."""
    try:
        t = pq.read_table(f)
        t.validate(full=True)  # text that is not UTF-8 fails here, named, not in a later use
        names, df = t.column_names, t.to_pandas()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise PredictionsError(f"{f}: not a readable Parquet file ({e})") from None
    missing = [c for c in ("query_id", "true_lat", "true_lon", "pred_lat", "pred_lon") if c not in names]
    if missing:
        raise PredictionsError(f"{f}: not a geo predictions file (missing columns {', '.join(missing)})")
    _check_confidence(df, f)
    return df


def _check_confidence(df: pd.DataFrame, path: Path, column: str = "confidence") -> None:
    """Refuse a confidence outside [0, 1] (or not a number): scored or reported as given, -3 or 7 would skew
    every calibration figure. An empty cell (NaN) stays allowed: no confidence reported, or no answer."""
    import pandas as pd

    if column not in df.columns:
        return
    raw = df[column]
    num = pd.to_numeric(raw, errors="coerce").astype("float64")
    given = raw.notna().to_numpy() & (raw.astype(str) != "").to_numpy()
    bad = given & ~((num >= 0) & (num <= 1)).to_numpy()  # NaN and inf fail the comparison
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise PredictionsError(f"{path}: {int(bad.sum())} row(s) with column {column!r} outside 0..1 "
                               f"(first: row {i}, {raw.iloc[i]!r})")


def _check_unique(df: pd.DataFrame, path: Path) -> None:
    """Refuse a photo answered twice (in one mode): it would count twice in every figure of the score."""
    keys = ["query_id"] + (["mode"] if "mode" in df.columns else [])
    dup = df.duplicated(keys, keep=False).to_numpy()
    if dup.any():
        example = df["query_id"].iloc[int(np.flatnonzero(dup)[0])]
        raise PredictionsError(f"{path}: {int(df.duplicated(keys).sum())} duplicate id(s), e.g. {example!r} "
                               f"appears more than once{' in one mode' if 'mode' in keys else ''}")


class ShardedWriter:
    """Append-safe, resumable writer for a long benchmark.

    Each :meth:`append` writes one shard atomically, so a killed run loses at
    most the batch in flight; :meth:`finish` merges everything into ``out``.
    A row is keyed by (query id, mode): one file can hold every mode of a run.
    """

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.parts = self.out.with_name(self.out.name + ".parts")

    def _shards(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.parquet")) if self.parts.is_dir() else []

    def done_keys(self) -> set[tuple[str, str]]:
        """(query id, mode) pairs already written by an earlier (possibly interrupted) run."""
        keys: set[tuple[str, str]] = set()
        for f in ([self.out] if self.out.exists() else []) + self._shards():
            try:
                t = pq.read_table(f, columns=["query_id", "mode"])
            except (pa.ArrowInvalid, OSError, KeyError) as e:
                raise PredictionsError(f"{f}: cannot resume from it ({e}); delete it to start over") from None
            keys.update(zip(t.column("query_id").to_pylist(), t.column("mode").to_pylist()))
        return keys

    def append(self, df: pd.DataFrame) -> None:
        if df.empty:
            return
        shards = self._shards()
        nxt = int(shards[-1].stem.split("-")[1]) + 1 if shards else 0
        atomic_write_parquet(self.parts / f"part-{nxt:05d}.parquet", to_table(df))

    def finish(self) -> pd.DataFrame:
        """Merge the previous output and all shards into ``out``; returns all rows."""
        import pandas as pd

        sources = ([self.out] if self.out.exists() else []) + self._shards()
        df = read_predictions(sources) if sources else conform(pd.DataFrame(columns=COLUMNS))
        df = df.drop_duplicates(["query_id", "mode"], keep="last").reset_index(drop=True)
        write_predictions(self.out, df)
        if self.parts.is_dir():
            shutil.rmtree(self.parts)
        return df


# ---------------------------------------------------------------- foreign files (geo bench score)
_CANDIDATES = {  # a foreign file's own names first, then the manifest aliases (truth, when no pred_ prefix)
    "query_id": ("query_id", "img_id", *ID_COLUMNS, *PATH_COLUMNS),
    "true_lat": ("true_lat", "gt_lat", "lat_true", "gt_latitude", *LAT_COLUMNS),
    "true_lon": ("true_lon", "gt_long", "gt_lon", "lon_true", "gt_longitude", *LON_COLUMNS),
    "pred_lat": ("pred_lat", "predicted_lat", "lat_pred", "pred_latitude", "predicted_latitude"),
    "pred_lon": ("pred_lon", "predicted_long", "predicted_lon", "lon_pred", "pred_longitude", "predicted_longitude"),
}


def detect_columns(columns: Sequence[str], given: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """Map our names (true_lat, ...) to the file's column names; ``given`` overrides detection."""
    given = {k: v for k, v in (given or {}).items() if v}
    out: dict[str, str] = {}
    for ours, names in _CANDIDATES.items():
        col = given.get(ours) or find_column(columns, names)
        if col is not None:
            if col not in columns:
                raise PredictionsError(f"column {col!r} (given for {ours}) is not in the file; it has {', '.join(columns)}")
            out[ours] = col
    return out


def read_scored_file(path: str | os.PathLike, columns: Mapping[str, str | None] | None = None
                     ) -> tuple[pd.DataFrame, str | None]:
    """Any predictions file with truth and prediction: ours (Parquet/CSV), GeoEstimation's, OSV-5M's.

    Returns rows in :data:`SCHEMA` and, for GeoEstimation result files, their
    footer (the text after the first blank line) so a caller can check it is
    reproduced. Rows with missing, non-numeric or out-of-range coordinates
    are an error that names them, never silently skipped.
    """
    import pandas as pd

    path = Path(path)
    try:
        regular_size(path, cap=NO_CAP)
    except FileRefused as e:
        raise PredictionsError(f"{path}: {'no such file' if e.reason == 'file not found' else e.reason}") from None
    footer = None
    if path.suffix.lower() == ".parquet":
        try:
            raw = pq.read_table(path).to_pandas()
        except (pa.ArrowInvalid, OSError) as e:
            raise PredictionsError(f"{path}: not a readable Parquet file ({e})") from None
    else:
        import io

        text = path.read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines()
        blank = next((i for i, line in enumerate(lines) if not line.strip()), None)
        if blank is not None:
            footer = "\n".join(line.strip() for line in lines[blank + 1 :] if line.strip()) or None
            lines = lines[:blank]
        try:
            raw = pd.read_csv(io.StringIO("\n".join(lines)), dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            raise PredictionsError(f"{path}: not a readable CSV ({e})") from None
    cols = detect_columns(list(raw.columns), columns)
    need = [c for c in ("true_lat", "true_lon", "pred_lat", "pred_lon") if c not in cols]
    if need:
        raise PredictionsError(
            f"{path}: cannot find columns for {', '.join(need)} (has {', '.join(map(str, raw.columns))}); "
            "name them with --column ROLE=NAME (ROLE: true_lat, true_lon, pred_lat, pred_lon)"
        )
    df = pd.DataFrame({ours: raw[theirs].to_numpy() for ours, theirs in cols.items()})
    if "query_id" not in df.columns:
        df["query_id"] = [str(i) for i in range(len(df))]
    df["query_id"] = df["query_id"].astype(str)
    coords = ("true_lat", "true_lon", "pred_lat", "pred_lon")
    num = {c: pd.to_numeric(df[c], errors="coerce") for c in coords}
    bad = ~(pd.concat(num, axis=1).notna().all(axis=1)
            & (num["true_lat"].abs() <= 90) & (num["pred_lat"].abs() <= 90)
            & (num["true_lon"].abs() <= 180) & (num["pred_lon"].abs() <= 180))
    if "error" in raw.columns:  # our own files: a row the index could not read is a failure, not bad input
        bad &= ~(raw["error"].notna() & (raw["error"].astype(str) != "")).to_numpy()
    if bad.any():
        where = (lambda i: f"row {i}") if path.suffix.lower() == ".parquet" else (lambda i: f"line {i + 2}")
        desc = []
        for i in np.flatnonzero(bad.to_numpy())[:10]:
            vals = ", ".join(f"{cols[c]}={raw[cols[c]].iloc[i]!r}" for c in coords if pd.isna(num[c].iloc[i])
                             or abs(num[c].iloc[i]) > (90 if "lat" in c else 180))
            desc.append(f"{where(i)} ({df['query_id'].iloc[i]}: {vals})")
        more = f" and {int(bad.sum()) - 10} more" if bad.sum() > 10 else ""
        raise PredictionsError(
            f"{path}: {int(bad.sum())} row(s) with missing, non-numeric or out-of-range coordinates: "
            + "; ".join(desc) + more
        )
    for c in coords:
        df[c] = num[c]
    for extra in ("scene", "country", "mode", "suite", "confidence", "path", "index_id", "created", "error",
                  "top_cells", "topk"):
        if extra in raw.columns and extra not in df.columns:
            df[extra] = raw[extra].replace("", None).to_numpy() if raw[extra].dtype == object else raw[extra].to_numpy()
    _check_confidence(raw, path)
    _check_unique(df, path)
    return conform(df), footer
