"""Precomputed embeddings in: a Parquet file or folder, or clip-retrieval / img2dataset output.

A user who already has embeddings (clip-retrieval's ``clip_inference``, a
Spark job, their own model) should not re-embed millions of photos. Two forms
are read, in order and in pieces of a bounded number of rows:

* Parquet: one file, or a folder of ``*.parquet`` files (sorted by name), with
  an embedding column (``--embedding-column``, default ``embedding``: a list or
  fixed-size list of float16/float32/float64), coordinates under any alias of
  :mod:`geo.data.columns`, an optional ``id`` (else the image path, else the row
  number) and any other columns, which are kept (a group column such as
  ``AUTHOR`` among them).
* clip-retrieval / img2dataset output: a folder with ``img_emb/img_emb_N.npy``
  and ``metadata/metadata_N.parquet``, paired by N in order, row for row.

Each bad row becomes an error row (row number, id and reason) and the rest go
on: a missing or null embedding, a wrong dimension, NaN or infinite values, a
zero vector, a missing or out-of-range coordinate, a duplicate id, a value of
the wrong type. Only a source that cannot be used at all raises
:class:`EmbeddingTableError`. Embeddings are L2-normalised on the way in, as
the engine's inner-product search expects.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from geo.core.files import NO_CAP, FileRefused, regular_size, streamed_parquet
from geo.core.names import find_column
from geo.data.columns import ID_COLUMNS, LAT_COLUMNS, LON_COLUMNS, PATH_COLUMNS, as_text

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_COLUMN = "embedding"
READ_ROWS = 8192  # input rows decoded at a time; a piece (a shard's worth) is assembled from such batches
_CLIP_EMB = re.compile(r"^img_emb_(\d+)\.npy$")
_CLIP_META = re.compile(r"^metadata_(\d+)\.parquet$")


class EmbeddingTableError(ValueError):
    """A source of embeddings that cannot be used at all; the message names the file and the reason."""


@dataclass
class EmbeddingPiece:
    """Consecutive input rows: the valid ones (metadata + L2-normalised embeddings) and an error row per bad one."""

    meta: pd.DataFrame  # id (str), path (str), lat, lon (float64, NaN where not required and absent), extras
    emb: np.ndarray     # float32 [len(meta), dim]
    errors: list[dict] = field(default_factory=list)  # {"path", "id", "stage": "embedding", "reason", "row"}
    rows: int = 0       # input rows this piece covers, good and bad
    first: int = 0      # input row number (0-based) of the piece's first row
    ok_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # valid rows' positions in the piece


@dataclass
class _Part:
    meta: Path            # a Parquet file (the embeddings' own, or clip-retrieval's metadata)
    npy: Path | None      # clip-retrieval's embeddings for it, row for row


class EmbeddingTable:
    """Precomputed embeddings at ``path``, read in order in pieces (see the module docstring for the forms)."""

    def __init__(self, path: str | os.PathLike, embedding_column: str = DEFAULT_COLUMN, dim: int | None = None,
                 require_coordinates: bool = True):
        self.path = Path(path)
        self.column = embedding_column
        self.require_coordinates = require_coordinates
        self.parts = self._discover()
        self.columns = [str(c) for c in _parquet(self.parts[0].meta).schema_arrow.names]
        self.lat_col = find_column(self.columns, LAT_COLUMNS)
        self.lon_col = find_column(self.columns, LON_COLUMNS)
        if require_coordinates and (self.lat_col is None or self.lon_col is None):
            raise EmbeddingTableError(f"{self.parts[0].meta}: no latitude/longitude columns "
                                      f"({'/'.join(LAT_COLUMNS)}, {'/'.join(LON_COLUMNS)}, any case); "
                                      f"it has {', '.join(self.columns[:20])}")
        self.id_col = find_column(self.columns, ID_COLUMNS)
        self.path_col = find_column(self.columns, PATH_COLUMNS)
        if self.parts[0].npy is None and self.column not in self.columns:
            raise EmbeddingTableError(f"{self.parts[0].meta}: no embedding column {self.column!r} "
                                      f"(--embedding-column); it has {', '.join(self.columns[:20])}")
        self.dim = dim if dim is not None else self._first_dim()

    # ------------------------------------------------------------ discovery
    def _discover(self) -> list[_Part]:
        p = self.path
        if not p.exists():
            raise EmbeddingTableError(f"{p}: no such file or folder of embeddings")
        if not p.is_dir():
            try:
                regular_size(p, cap=NO_CAP)
            except FileRefused as e:
                raise EmbeddingTableError(f"{p}: {e.reason}") from None
            return [_Part(p, None)]
        if (p / "img_emb").is_dir() and (p / "metadata").is_dir():
            return self._clip_retrieval(p)
        files = sorted(f for f in p.rglob("*.parquet") if f.is_file())
        if not files:
            raise EmbeddingTableError(f"{p}: no .parquet files, and not clip-retrieval output "
                                      "(img_emb/img_emb_N.npy + metadata/metadata_N.parquet)")
        return [_Part(f, None) for f in files]

    @staticmethod
    def _clip_retrieval(root: Path) -> list[_Part]:
        embs = {int(m.group(1)): f for f in (root / "img_emb").iterdir() if (m := _CLIP_EMB.match(f.name))}
        metas = {int(m.group(1)): f for f in (root / "metadata").iterdir() if (m := _CLIP_META.match(f.name))}
        if not embs:
            raise EmbeddingTableError(f"{root / 'img_emb'}: no img_emb_N.npy files")
        unpaired = sorted(set(embs) ^ set(metas))
        if unpaired:
            raise EmbeddingTableError(f"{root}: img_emb_N.npy and metadata_N.parquet do not pair up "
                                      f"(N = {', '.join(map(str, unpaired[:5]))} has only one of the two)")
        return [_Part(metas[n], embs[n]) for n in sorted(embs)]

    @property
    def fingerprint(self) -> str:
        """Identity of the source (file names, sizes, modification times): resuming against another is refused."""
        h = hashlib.sha256(self.column.encode())
        for part in self.parts:
            for f in (part.meta, part.npy):
                if f is not None:
                    st = f.stat()
                    h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()

    @property
    def rows(self) -> int:
        return sum(_parquet(part.meta).metadata.num_rows for part in self.parts)

    def _first_dim(self) -> int:
        """The dimension of the first usable embedding: what every row must then have."""
        for part in self.parts:
            for _, _, lengths in self._batches(part, 4096):
                ok = lengths > 0
                if ok.any():
                    return int(lengths[ok][0])
        raise EmbeddingTableError(f"{self.path}: no row holds an embedding")

    # ------------------------------------------------------------ reading
    def _raw(self, rows: int) -> Iterator[tuple[pd.DataFrame, np.ndarray, np.ndarray]]:
        """(metadata, float32 [n, dim] embeddings, lengths) per piece of at most ``rows`` input rows, a part's
        last piece shorter. A piece is decoded :data:`READ_ROWS` rows at a time into its one matrix (a row of
        another length, or null, stays zero: its length says so), so Arrow never holds more than a batch:
        decoding a 50K x 1280 piece whole held 4.5x its bytes at once."""
        for part in self.parts:
            yield from _regrouped(self._batches(part, min(rows, READ_ROWS)), rows, self.dim)

    def _batches(self, part: _Part, rows: int) -> Iterator[tuple[pd.DataFrame, list[np.ndarray | None] | np.ndarray,
                                                                  np.ndarray]]:
        """One part's (metadata, embeddings, lengths) per batch; lengths -1 for a null embedding. The batch is
        validated and converted here, so that a damaged part (undecodable text) is named like any other
        unreadable one. Parquet embeddings come as a list of per-row arrays (any length, so a wrong one can be
        reported) or, from a fixed-size list, one matrix; clip-retrieval's as a 2-D array."""
        try:
            pf = streamed_parquet(part.meta)
            if part.npy is not None:
                emb = np.load(part.npy, mmap_mode="r", allow_pickle=False)
                if emb.ndim != 2 or emb.shape[0] != pf.metadata.num_rows:
                    raise EmbeddingTableError(f"{part.npy}: shape {emb.shape} does not pair with "
                                              f"{part.meta.name}'s {pf.metadata.num_rows} rows")
            start = 0
            for batch in pf.iter_batches(batch_size=rows):
                table = pa.Table.from_batches([batch])
                table.validate(full=True)  # text that is not UTF-8 fails here, named, not in a later use
                if part.npy is not None:
                    mat = np.asarray(emb[start:start + len(table)])
                    start += len(table)
                    yield table.to_pandas(), mat, np.full(len(table), mat.shape[1])
                else:
                    yield (table.drop_columns([self.column]).to_pandas(),
                           *_lists(table.column(self.column), part.meta, self.column))
        except (pa.ArrowException, OSError, ValueError) as e:
            if isinstance(e, EmbeddingTableError):
                raise
            raise EmbeddingTableError(f"{part.npy or part.meta}: cannot read ({e})") from None

    def pieces(self, rows: int = 50_000, seen: set[str] | None = None) -> Iterator[EmbeddingPiece]:
        """Valid rows and error rows, ``rows`` input rows at a time, in input order; ids in ``seen`` (a bundle's,
        when adding to it) count as duplicates."""
        seen = set() if seen is None else set(seen)
        first = 0
        for df, vec, lengths in self._raw(rows):
            yield self._validate(df, vec, lengths, first, seen)
            first += len(df)

    def _validate(self, df: pd.DataFrame, vec: np.ndarray, lengths: np.ndarray, first: int,
                  seen: set[str]) -> EmbeddingPiece:
        import pandas as pd

        n = len(df)
        reasons: list[str | None] = [None] * n
        ids = _ids(df, self.id_col, self.path_col, first)
        lat, lon = (_coordinate(df, col, n) for col in (self.lat_col, self.lon_col))
        for i in range(n):
            reasons[i] = _coordinate_problem(lat[1][i], lon[1][i], self.require_coordinates, lat[0][i], lon[0][i])
        for i in range(n):
            if reasons[i] is not None:
                continue
            if lengths[i] < 0:
                reasons[i] = "no embedding (null)"
            elif lengths[i] != self.dim:
                reasons[i] = f"embedding has {int(lengths[i])} values, expected {self.dim}"
        problems = vector_problems(vec)
        for i in range(n):
            if reasons[i] is None and problems[i] is not None:
                reasons[i] = f"embedding {problems[i]}"
            elif reasons[i] is None and ids[i] in seen:
                reasons[i] = f"duplicate id {ids[i]!r}"
            if reasons[i] is None:
                seen.add(ids[i])
        ok = np.array([r is None for r in reasons], bool)
        where = str(self.path)
        errors = [{"path": where, "id": ids[i], "stage": "embedding", "reason": f"row {first + i + 1}: {reasons[i]}",
                   "row": int(first + i)} for i in np.flatnonzero(~ok)]
        extras = [c for c in df.columns if c not in (self.id_col, self.path_col, self.lat_col, self.lon_col)
                  and c not in ("id", "path", "lat", "lon")]
        meta = pd.DataFrame({
            "id": pd.Series([ids[i] for i in np.flatnonzero(ok)], dtype=object),
            "path": pd.Series(df[self.path_col].astype(str).to_numpy()[ok] if self.path_col else [""] * int(ok.sum()),
                              dtype=object),
            "lat": lat[1][ok], "lon": lon[1][ok],
        })
        for c in extras:
            meta[str(c)] = df[c].to_numpy()[ok]
        # every row valid (the usual case): normalised in place, no second copy of the piece
        unit = unit_rows(vec, out=vec) if ok.all() else unit_rows(vec[ok])
        return EmbeddingPiece(meta, unit, errors, n, first, np.flatnonzero(ok))


def _regrouped(batches: Iterator[tuple[pd.DataFrame, list[np.ndarray | None] | np.ndarray, np.ndarray]], rows: int,
               dim: int) -> Iterator[tuple[pd.DataFrame, np.ndarray, np.ndarray]]:
    """Batches gathered into pieces of ``rows`` rows (the last one shorter), each piece's embeddings copied into
    one float32 [n, dim] matrix as its batches arrive; a row whose length is not ``dim`` stays zero."""
    import pandas as pd  # the build's input side only: a cold query never imports pandas

    frames: list[pd.DataFrame] = []
    lens: list[np.ndarray] = []
    vec, filled = np.zeros((rows, dim), np.float32), 0
    for df, mat, lengths in batches:
        at = 0
        while at < len(df):
            take = min(len(df) - at, rows - filled)
            _fill(vec[filled:filled + take], mat, lengths, at, dim)
            frames.append(df.iloc[at:at + take])
            lens.append(lengths[at:at + take])
            filled, at = filled + take, at + take
            if filled == rows:
                yield pd.concat(frames, ignore_index=True), vec, np.concatenate(lens)
                frames, lens, vec, filled = [], [], np.zeros((rows, dim), np.float32), 0
    if filled:
        yield pd.concat(frames, ignore_index=True), vec[:filled], np.concatenate(lens)


def _fill(dst: np.ndarray, mat: list[np.ndarray | None] | np.ndarray, lengths: np.ndarray, at: int, dim: int) -> None:
    """Rows ``at``.. of a batch's embeddings into ``dst`` (as many as it holds), those of length ``dim`` only."""
    fits = lengths[at:at + len(dst)] == dim
    if isinstance(mat, np.ndarray):
        if mat.shape[1] == dim:
            dst[fits] = mat[at:at + len(dst)][fits]
        return
    for i in np.flatnonzero(fits):
        dst[i] = mat[at + i]


NORM_ROWS = 8192  # rows per float64 block when norms are taken: [NORM_ROWS, dim] at a time, never a copy of a piece


def _norms(rows: np.ndarray) -> np.ndarray:
    """float64 [n] lengths of ``rows`` [n, dim], non-finite rows counted as 0, a block of rows at a time (a 50K x
    1280 piece in float64 at once is 0.5 GB, and ingesting one held 13x its bytes)."""
    out = np.empty(len(rows))
    for s in range(0, len(rows), NORM_ROWS):
        block = rows[s:s + NORM_ROWS].astype(np.float64)
        block[~np.isfinite(block).all(axis=1)] = 0.0
        out[s:s + NORM_ROWS] = np.linalg.norm(block, axis=1)
    return out


def vector_problems(vec: np.ndarray) -> list[str | None]:
    """Why each vector of ``vec`` (its last axis) cannot be compared, or None: the one rule for embeddings that
    come in from outside (precomputed tables here, JSON rows posted to ``geo serve``)."""
    rows = vec.reshape(-1, vec.shape[-1]) if vec.ndim > 1 else vec[None]
    finite = np.isfinite(rows).all(axis=1)
    norm = _norms(rows)
    return [None if f and z > 0 else "holds NaN or infinite values" if not f else
            "is a zero vector (no direction to compare)" for f, z in zip(finite, norm)]


def unit_rows(vec: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``vec`` scaled to length 1 along its last axis (the norm taken in float64, so large finite values do not
    overflow it), as float32: how every embedding is stored and searched. Divided a block of rows at a time,
    in float64 as the norm, so the result is the same as one division of the whole. ``out``: where to write
    it (``vec`` itself, when it is float32 and its rows are not needed again)."""
    rows = vec.reshape(-1, vec.shape[-1]) if vec.ndim > 1 else vec[None]
    out = np.empty(rows.shape, np.float32) if out is None else out.reshape(rows.shape)
    for s in range(0, len(rows), NORM_ROWS):
        block = rows[s:s + NORM_ROWS].astype(np.float64)
        out[s:s + NORM_ROWS] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out.reshape(vec.shape)


def _parquet(path: Path) -> pq.ParquetFile:
    """Open one part: pyarrow's message alone does not say which file of a folder is damaged."""
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise EmbeddingTableError(f"{path}: not a readable Parquet file ({e})") from None


def _lists(column: pa.ChunkedArray, where: Path,
           name: str) -> tuple[list[np.ndarray | None] | np.ndarray, np.ndarray]:
    """Per-row float arrays of a list column (any length; a fixed-size list without nulls: one [rows, dim]
    matrix) and their lengths (-1 for null)."""
    import pyarrow.compute as pc  # 50 ms to import: only --embeddings input needs it, not a query of photos

    arr = column.combine_chunks()
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type)) \
            or not (pa.types.is_floating(arr.type.value_type) or pa.types.is_integer(arr.type.value_type)):
        raise EmbeddingTableError(f"{where}: column {name!r} is {arr.type}, not a list of floats")
    lengths = pc.fill_null(pc.list_value_length(arr), -1).to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_fixed_size_list(arr.type) and arr.null_count == 0:  # one [rows, dim] view of Arrow's buffer
        values = arr.flatten()  # zero-copy for a fixed-size list; list_flatten + cast copied a piece twice
        values = values if values.type == pa.float32() else values.cast(pa.float32())
        return values.to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size), lengths
    flat = pc.list_flatten(arr).cast(pa.float32()).to_numpy(zero_copy_only=False)
    out: list[np.ndarray | None] = []
    pos = 0
    for n in lengths:
        if n < 0:
            out.append(None)
            continue
        out.append(flat[pos:pos + n])
        pos += n
    return out, lengths


def _ids(df: pd.DataFrame, id_col: str | None, path_col: str | None, first: int) -> list[str]:
    col = id_col or path_col
    if col is None:
        return [f"row-{first + i + 1}" for i in range(len(df))]
    return [v if v is not None else f"row-{first + i + 1}" for i, v in enumerate(as_text(df[col].tolist()))]


def _coordinate(df: pd.DataFrame, col: str | None, n: int) -> tuple[list, np.ndarray]:
    """(raw values for messages, float64 values: NaN where missing, non-numeric or boolean)."""
    import pandas as pd

    if col is None:
        return [None] * n, np.full(n, np.nan)
    raw = df[col]
    if pd.api.types.is_bool_dtype(raw):
        return raw.tolist(), np.full(n, np.nan)
    return raw.tolist(), pd.to_numeric(raw, errors="coerce").to_numpy(np.float64)


def _missing(raw) -> bool:
    return raw is None or (isinstance(raw, float) and np.isnan(raw))


def _coordinate_problem(lat: float, lon: float, required: bool, raw_lat, raw_lon) -> str | None:
    """Why a row's coordinates are unusable, or None. Queries (``required`` False) may leave them out."""
    for name, v, raw, lim in (("latitude", lat, raw_lat, 90), ("longitude", lon, raw_lon, 180)):
        if isinstance(raw, (bool, np.bool_)):
            return f"{name} {raw!r} is a boolean, not a number"
        if not np.isfinite(v):
            if not required and _missing(raw):
                continue
            return f"{name} {raw!r} is missing or not a finite number"
        if abs(v) > lim:
            return f"{name} {v} out of range [-{lim}, {lim}]"
    return None
