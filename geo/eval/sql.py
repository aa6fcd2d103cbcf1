"""``geo sql``: DuckDB over predictions files, exposed as one ``predictions`` view.

DuckDB reads the Parquet files in place (no import step) and
``union_by_name`` lets files from different runs, with or without the
optional scene/country columns, be queried together.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import pandas as pd


class SqlError(ValueError):
    """A query or an input file DuckDB could not use; the message says which and why."""


def _files(paths: Iterable[str | os.PathLike]) -> list[str]:
    out: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.parquet"))
            if not found:
                raise SqlError(f"{p}: directory holds no .parquet files")
            out.extend(map(str, found))
        elif p.is_file():
            out.append(str(p))
        else:
            raise SqlError(f"{p}: no such predictions file")
    if not out:
        raise SqlError("no predictions files given (pass --predictions PATH)")
    return out


def run_sql(query: str, paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """Run ``query`` with a ``predictions`` view over ``paths`` and return the result."""
    import duckdb

    files = _files(paths)
    con = duckdb.connect(":memory:")
    try:
        listing = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
        try:
            con.execute(f"CREATE VIEW predictions AS SELECT * FROM read_parquet([{listing}], union_by_name = true)")
        except duckdb.Error as e:
            raise SqlError(f"{', '.join(files)}: cannot be read as Parquet ({e})") from None
        try:
            return con.execute(query).fetchdf()
        except duckdb.Error as e:
            raise SqlError(f"query failed: {e}") from None
    finally:
        con.close()
