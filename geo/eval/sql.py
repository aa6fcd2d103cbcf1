"""``geo sql``: DuckDB over predictions files (the ``predictions`` table) and a bundle's ``errors`` and
``embeddings`` metadata.

DuckDB reads the named Parquet files into in-memory tables (``union_by_name``
lets files from different runs, with or without the optional columns, be
queried together). Then external access is switched off and the
configuration locked, so the query itself reads and writes no other file,
installs and loads no extension and reaches no network: the command reads
only what ``-p`` and ``--bundle`` name.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from geo.core.files import NO_CAP, FileRefused, regular_size
from geo.store.bundle import BundleError, open_bundle
from geo.store.embeddings import EmbeddingReader

if TYPE_CHECKING:
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
        else:
            try:
                regular_size(p, cap=NO_CAP)
            except FileRefused as e:
                raise SqlError(f"{p}: {'no such predictions file' if e.reason == 'file not found' else e.reason}") \
                    from None
            out.append(str(p))
    if not out:
        raise SqlError("no predictions files given (pass --predictions PATH)")
    return out


def _listing(files: list[str]) -> str:
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"


def _bundle_files(bundle: str | os.PathLike) -> dict[str, list[str]]:
    """The bundle's errors file and the embedding shards its manifest lists (metadata only is exposed)."""
    try:
        b = open_bundle(bundle)
        shards = [str(p) for p in EmbeddingReader(b).shards]
    except BundleError as e:
        raise SqlError(str(e)) from None
    errors = b.path("errors.parquet")
    return {"embeddings": shards, **({"errors": [str(errors)]} if errors.is_file() else {})}


def run_sql(query: str, paths: Iterable[str | os.PathLike], bundle: str | os.PathLike | None = None) -> pd.DataFrame:
    """Run ``query`` over a ``predictions`` table (``paths``) and, with ``bundle``, its ``errors`` and
    ``embeddings`` (metadata, no vectors) tables; the query runs with DuckDB's external access off."""
    import duckdb

    if not query.strip():
        raise SqlError("empty query: give SQL, e.g. \"SELECT mode, median(error_km) FROM predictions GROUP BY 1\"")
    paths = list(paths)
    tables: dict[str, list[str]] = {"predictions": _files(paths)} if paths or bundle is None else {}
    if bundle is not None:
        tables.update(_bundle_files(bundle))
    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False,
                                             "autoload_known_extensions": False})
    try:
        for name, files in tables.items():
            columns = "* EXCLUDE (embedding)" if name == "embeddings" else "*"
            try:
                con.execute(f"CREATE TABLE {name} AS SELECT {columns} FROM read_parquet({_listing(files)}, "
                            "union_by_name = true)")
            except duckdb.Error as e:
                raise SqlError(f"{', '.join(files[:3])}: cannot be read as Parquet ({e})") from None
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        try:
            return con.execute(query).fetchdf()
        except duckdb.Error as e:
            raise SqlError(f"query failed: {e}") from None
    finally:
        con.close()
