"""Tables as numpy columns: what the query side reads from a bundle's Parquet files, without pandas.

Importing pandas cost a cold ``geo query`` a quarter of a second, and the query side only ever reads whole
columns of its tables (cells, support spots, gallery points, the kNN rows' ids). So a table read for
answering is a ``dict`` of numpy arrays (numbers as their numpy type, text as Python ``str`` objects, as
pandas gives them), and the code that reads tables takes such a dict or a build's DataFrame alike:
``table[name]`` and iterating the column names work on both, and ``np.asarray(table[name])`` is the same
array from either.

pyarrow imports pandas itself wherever it converts to numpy (``to_numpy``, ``np.asarray``: its conversion
code starts by importing pandas) and wherever ``pq.read_table`` goes (``pyarrow.dataset``, 0.3 s), so this
module reads a file with ``pq.ParquetFile`` and takes numbers out through DLPack, text as Python lists.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

Columns = dict[str, np.ndarray]


def read_columns(path: str | os.PathLike, columns: Sequence[str] | None = None) -> Columns:
    """A Parquet file's columns (None: all of them) as numpy arrays, in the file's order."""
    return arrow_columns(read_parquet(path, columns))


def read_parquet(path: str | os.PathLike, columns: Sequence[str] | None = None) -> pa.Table:
    """A Parquet file (or some of its columns) as one ``pyarrow.Table``, read without ``pyarrow.dataset``."""
    with pq.ParquetFile(path) as f:
        return f.read(columns=list(columns) if columns is not None else None)


def arrow_columns(table: pa.Table) -> Columns:
    """A ``pyarrow.Table``'s columns as numpy arrays, as pandas reads them: numbers without nulls in their own
    type (read-only views), with nulls as float64 NaN; text and anything else as Python objects (a missing one
    None, where pandas has NaN; a list a list, where pandas has an array)."""
    return {name: _numpy(table.column(name)) for name in table.column_names}


def _numpy(column: pa.ChunkedArray) -> np.ndarray:
    numeric = pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
    if numeric and column.null_count == 0:
        return np.from_dlpack(column.chunk(0) if column.num_chunks == 1 else column.combine_chunks())
    values = column.to_pylist()
    if numeric:
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    if pa.types.is_boolean(column.type) and column.null_count == 0:
        return np.array(values, dtype=bool)
    out = np.empty(len(values), dtype=object)  # not np.array(values): that would turn lists into a 2-d array
    out[:] = values
    return out


def columns_of(table: Any) -> Columns:
    """A DataFrame's (or any column mapping's) columns as numpy arrays: a loaded and a fitted table, one form."""
    return {str(name): np.asarray(table[name]) for name in table}


def positions(keys: Any, wanted: Any) -> np.ndarray:
    """The row of each ``wanted`` value among ``keys`` (unique), -1 where it is absent: what pandas'
    ``Index.get_indexer`` gives, for the cell tables' token lookups."""
    keys, wanted = np.asarray(keys).tolist(), np.asarray(wanted).tolist()
    row = {k: i for i, k in enumerate(keys)}
    if len(row) != len(keys):
        raise ValueError("positions: the keys are not unique")
    return np.fromiter((row.get(w, -1) for w in wanted), np.int64, len(wanted))


def text_objects(values: Any) -> np.ndarray:
    """Values as an object array of Python ``str`` (ids and paths, whatever type a table stored them as): what
    pandas' ``astype(str).to_numpy()`` gives, without a fixed-width copy of a column of long paths."""
    a = np.asarray(values)
    if a.dtype == object and all(isinstance(v, str) for v in a.tolist()):
        return a
    return np.array([str(v) for v in a.tolist()], dtype=object)
