"""Embedding shards: how they are written, and the one reader every stage and the query side use.

On disk (clip-retrieval's numbered shards)::

    embeddings/part-00000.parquet   id, path, lat, lon, <manifest extras>, embedding (fixed_size_list<float32>)
    embeddings/part-00000.json      completion marker and per-shard stats (rows, failed, seconds, errors)

A shard counts once its marker exists: the Parquet file is written first, the
marker second, each atomically, so a crash between the two leaves a shard that
is redone, never half-counted. Once the embedding stage is committed, readers
open exactly the shards ``manifest.json`` lists (a stray file in the folder is
never read) and stream them in pieces (embedding-reader style), so no stage
needs the whole gallery in memory unless it asks for it.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from geo.core.files import streamed_parquet
from geo.core.tables import Columns, arrow_columns, read_parquet
from geo.store.atomic import atomic_write_json, atomic_write_parquet
from geo.store.bundle import Bundle, BundleError, read_json

if TYPE_CHECKING:
    import pandas as pd

SHARD_DIR = "embeddings"


def shard_path(bundle: Bundle, i: int) -> Path:
    return bundle.path(f"{SHARD_DIR}/part-{i:05d}.parquet")


def marker_path(shard: Path) -> Path:
    return shard.with_suffix(".json")


def listed_shards(bundle: Bundle) -> list[str]:
    """The shards the manifest lists (relative paths, in order): the only ones a reader opens."""
    return sorted(rel for rel in bundle.manifest.get("files", {})
                  if rel.startswith(f"{SHARD_DIR}/part-") and rel.endswith(".parquet"))


def drop_unlisted_shards(bundle: Bundle) -> int:
    """Remove the finished shards the manifest does not list (an abandoned addition's): a later addition numbers
    its shards from the same place and must not take them for its own. Returns the shards removed."""
    listed = {bundle.path(rel) for rel in listed_shards(bundle)}
    stray = [p for p in finished_shards(bundle) if p not in listed]
    for p in stray:
        marker_path(p).unlink(missing_ok=True)  # the marker first: a shard without one is never counted
        p.unlink(missing_ok=True)
    return len(stray)


def finished_shards(bundle: Bundle) -> list[Path]:
    """Shards with a completion marker, in order: what a resumed or committing build has."""
    return sorted(p for p in bundle.path(SHARD_DIR).glob("part-*.parquet") if marker_path(p).exists())


def to_table(rows: pd.DataFrame, emb: np.ndarray, like: pa.Schema | None = None) -> pa.Table:
    """A shard's table. Text is always Arrow ``string`` (pandas hands ``string`` or ``large_string`` by the input's
    form), and with ``like`` (the schema of a bundle's committed shards) the rows take its columns and types:
    a column it lacks is dropped, one the rows lack is null. So every shard of a bundle has one schema, whether
    its rows came from a CSV, Parquet, an EXIF folder or precomputed embeddings."""
    table = pa.Table.from_pandas(rows.reset_index(drop=True), preserve_index=False)
    table = table.cast(pa.schema([pa.field(f.name, pa.string()) if pa.types.is_large_string(f.type) else f
                                  for f in table.schema], metadata=table.schema.metadata))
    if like is not None:
        table = _conform(table, like)
    flat = pa.array(np.ascontiguousarray(emb, dtype=np.float32).reshape(-1))
    return table.append_column("embedding", pa.FixedSizeListArray.from_arrays(flat, emb.shape[1]))


def _conform(table: pa.Table, like: pa.Schema) -> pa.Table:
    """``table`` with exactly the metadata columns of ``like``, in its order and types (see :func:`to_table`)."""
    columns = {}
    for f in like:
        if f.name == "embedding":
            continue
        if f.name not in table.column_names:
            columns[f.name] = pa.nulls(len(table), f.type)
            continue
        col = table[f.name]
        try:
            columns[f.name] = col if pa.types.is_null(f.type) else col.cast(f.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise BundleError(f"column {f.name!r}: the bundle holds {f.type}, and the new rows' {col.type} "
                              f"values cannot be read as that ({e})") from None
    return pa.table(columns)


def committed_schema(bundle: Bundle) -> pa.Schema | None:
    """The schema of the bundle's committed shards (None before the embedding stage is committed)."""
    listed = listed_shards(bundle)
    return pq.read_schema(bundle.path(listed[0])) if listed else None


SHARD_ROW_GROUP = 8192  # rows per row group of a shard: writing and reading one holds ~40 MB at 1280-d, not the shard
# Rows per piece read from the shards: pyarrow holds about three times a batch while reading it, so a build's
# passes over the shards (FAISS training sample, fill, recall, the training sample) held ~1 GB at 65,536 rows.
PIECE_ROWS = 8192


def write_shard(bundle: Bundle, i: int, rows: pd.DataFrame, emb: np.ndarray, stats: dict[str, Any]) -> Path:
    """Parquet first, then the marker: a crash between the two leaves a shard that is redone, never half-counted.
    The rows take the schema of the shards already committed (an addition's match the bundle's)."""
    part = shard_path(bundle, i)
    atomic_write_parquet(part, to_table(rows, emb, committed_schema(bundle)), row_group_size=SHARD_ROW_GROUP)
    atomic_write_json(marker_path(part), {"shard": i, "ok": len(rows), **stats})
    return part


def embedding_matrix(column) -> np.ndarray:
    """float32 [n, dim] from an Arrow fixed_size_list<float32> column without a Python loop."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    return np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)


def shard_pieces(shard: Path, columns: list[str] | None = None, batch_rows: int = PIECE_ROWS,
                 embeddings: bool = True) -> Iterator[tuple[pa.RecordBatch, np.ndarray | None]]:
    """One shard's (metadata batch, float32 [n, dim] or None) pieces: what a cluster task reads of its shard."""
    cols = None if columns is None else list(dict.fromkeys([*columns, *(["embedding"] if embeddings else [])]))
    try:
        pf = streamed_parquet(shard)
        for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
            emb = embedding_matrix(batch.column("embedding")) if embeddings else None
            meta = batch.drop_columns(["embedding"]) if "embedding" in batch.schema.names else batch
            yield meta, emb
    except (pa.ArrowInvalid, OSError) as e:
        raise BundleError(f"{shard}: cannot read embeddings ({e})") from None


class EmbeddingReader:
    """The committed shards of a bundle, read in pieces.

    Rows come in shard order, which is also the order of the kNN index's ids.
    """

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        listed = listed_shards(bundle)
        if not listed:
            raise BundleError(f"{bundle.root}: no embeddings committed (did every image fail? see errors.parquet)")
        self.shards = [bundle.path(rel) for rel in listed]

    @property
    def columns(self) -> list[str]:
        """The metadata columns (every shard has the first one's schema)."""
        return [c for c in pq.ParquetFile(self.shards[0]).schema_arrow.names if c != "embedding"]

    @property
    def count(self) -> int:
        return sum(pq.ParquetFile(s).metadata.num_rows for s in self.shards)

    def iter(self, columns: list[str] | None = None, batch_rows: int = PIECE_ROWS,
             embeddings: bool = True) -> Iterator[tuple[pa.RecordBatch, np.ndarray | None]]:
        """(metadata batch, float32 [n, dim] or None) pieces of at most ``batch_rows`` rows."""
        for shard in self.shards:
            yield from shard_pieces(shard, columns, batch_rows, embeddings)

    def read(self, columns: list[str] | None = None) -> tuple[pd.DataFrame, np.ndarray]:
        """All metadata as a DataFrame and all embeddings as float32 [n, dim]: for galleries that fit in memory.

        The matrix is allocated once and filled piece by piece, so the peak is the embeddings' bytes, not twice that.
        """
        return self.take(None, columns)

    def take(self, rows: np.ndarray | None, columns: list[str] | None = None,
             dtype: type = np.float32) -> tuple[pd.DataFrame, np.ndarray]:
        """Metadata and embeddings (float32, or ``dtype``: a large build's float16 training sample) of the given
        row numbers (sorted, unique; None: every row), streamed: each piece is cast as it is copied in."""
        total = self.count
        keep = np.arange(total) if rows is None else np.asarray(rows, np.int64)
        if len(keep) and (keep.min() < 0 or keep.max() >= total or np.any(np.diff(keep) <= 0)):
            raise ValueError(f"take: rows must be sorted, unique and within 0..{total - 1}")
        metas, out, start, filled = [], None, 0, 0
        for meta, emb in self.iter(columns):
            pick = keep[np.searchsorted(keep, start):np.searchsorted(keep, start + len(emb))] - start
            start += len(emb)
            if out is None:
                out = np.empty((len(keep), emb.shape[1]), dtype)
            out[filled:filled + len(pick)] = emb[pick]
            filled += len(pick)
            metas.append(pa.Table.from_batches([meta]).take(pa.array(pick)))
        return pa.concat_tables(metas).to_pandas(), out

    def read_meta(self, columns: list[str] | None = None) -> pd.DataFrame:
        """Metadata columns of every row (None: all of them), without the embeddings."""
        return self._meta_table(columns).to_pandas()

    def read_columns(self, columns: list[str] | None = None) -> Columns:
        """:meth:`read_meta` as numpy columns (:mod:`geo.core.tables`): what the query side keeps, read without
        pandas."""
        return arrow_columns(self._meta_table(columns))

    def _meta_table(self, columns: list[str] | None) -> pa.Table:
        if columns is None:
            columns = self.columns
        return pa.concat_tables([read_parquet(s, columns) for s in self.shards], promote_options="default")

    def sample(self, rows: int, seed: int = 0) -> np.ndarray:
        """A seeded uniform sample of the embeddings, read shard by shard."""
        total = self.count
        keep = np.sort(np.random.default_rng(seed).choice(total, size=min(rows, total), replace=False))
        return self.take(keep, columns=[])[1]


def shard_errors(bundle: Bundle) -> list[dict]:
    """Every image that failed, from the finished shards' markers."""
    return [e for p in finished_shards(bundle) for e in read_json(marker_path(p))["errors"]]
