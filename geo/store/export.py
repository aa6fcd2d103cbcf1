"""A bundle's embeddings out again (``geo export``): the inverse of ``--embeddings``.

Two forms, both of which ``geo build-index --embeddings OUT`` and ``geo add --embeddings OUT`` read back to the
same vectors, ids, coordinates and extra columns (a photographer column among them):

* ``parquet``: ``OUT/part-NNNNN.parquet``, one file per shard of the bundle, each with the shard's metadata
  columns (``id``, ``path``, ``lat``, ``lon``, the manifest's extras) and ``embedding`` (fixed-size lists of
  float32, L2-normalised).
* ``clip-retrieval``: clip-retrieval's layout, ``OUT/img_emb/img_emb_N.npy`` (float32 ``[rows, dim]``) and
  ``OUT/metadata/metadata_N.parquet`` (the same metadata columns, row for row), N numbering the shards from 0:
  what autofaiss and clip-retrieval's back end index.

Only the shards the manifest lists are read, each checked against its recorded size and sha256 first
(:meth:`Bundle.check_file`, as ``geo info --verify`` checks every file), so a damaged bundle is refused rather than
exported; every file goes through :mod:`geo.store.atomic`.
"""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq

from geo.store.atomic import atomic_save_npy, atomic_write_parquet
from geo.store.bundle import Bundle
from geo.store.embeddings import embedding_matrix, listed_shards

FORMATS = ("parquet", "clip-retrieval")


class ExportError(ValueError):
    """An export that cannot start (its folder holds files already); the message names the folder."""


def export_embeddings(bundle: Bundle, out: str | os.PathLike, form: str) -> tuple[int, int]:
    """Write the bundle's embeddings under ``out`` in ``form`` (one of :data:`FORMATS`); returns (rows, files).

    ``out`` must be missing or empty: a part left from another export would be read back with these.
    """
    if form not in FORMATS:  # geo export's --format checks it first, with its own words
        raise ValueError(f"an export's format is one of {', '.join(FORMATS)}, not {form!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: exists and is not an empty folder (an export writes a folder of its own)")
    rows = files = 0
    for n, rel in enumerate(listed_shards(bundle)):
        table = pq.read_table(bundle.check_file(rel))  # a damaged shard is refused before anything of it is written
        if form == "parquet":
            atomic_write_parquet(out / f"part-{n:05d}.parquet", table)
        else:
            atomic_save_npy(out / "img_emb" / f"img_emb_{n}.npy", embedding_matrix(table.column("embedding")))
            atomic_write_parquet(out / "metadata" / f"metadata_{n}.parquet", table.drop_columns(["embedding"]))
        rows, files = rows + len(table), files + (1 if form == "parquet" else 2)
    return rows, files

