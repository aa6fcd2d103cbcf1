"""Embedding stage: manifest rows -> numbered Parquet shards of L2-normalised embeddings (:mod:`geo.store.embeddings`).

Resumable in the clip-retrieval way: the manifest is cut into fixed row
ranges (shards); a shard counts as done only once its marker
``part-NNNNN.json`` exists, and the marker is written (atomically) after the
Parquet file. A re-run skips done shards and redoes the others from scratch,
so no row is ever written twice. The plan (shard size and a fingerprint of
the manifest) is stored in the bundle so that resuming with another manifest
is refused instead of silently mixing galleries.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from geo.core.memory import feature_maps_kept, release_unused
from geo.core.progress import bar as progress_bar
from geo.data.embedding_table import EmbeddingTable
from geo.data.images import ImageDataset, collate_skip_errors
from geo.models.registry import Backbone
from geo.store.bundle import Bundle, BundleError, read_json
from geo.store.embeddings import finished_shards, marker_path, shard_path, write_shard

if TYPE_CHECKING:
    import pandas as pd

STAGE = "embeddings"


@dataclass(frozen=True)
class EmbedConfig:
    batch_size: int = 64
    workers: int = -1  # -1: one per core, capped at 8; 0 decodes in the main process
    shard_rows: int = 50_000

    def resolved_workers(self) -> int:
        return min(8, os.cpu_count() or 1) if self.workers < 0 else self.workers


def manifest_fingerprint(df: pd.DataFrame) -> str:
    """Identity of the rows to embed; resuming against a different manifest is refused."""
    import pandas as pd

    h = hashlib.sha256()
    for col in ("id", "path", "lat", "lon"):
        h.update(pd.util.hash_pandas_object(df[col], index=False).to_numpy().tobytes())
    return h.hexdigest()


def _embed_rows(rows: pd.DataFrame, backbone: Backbone, cfg: EmbedConfig, bar: tqdm | None) -> tuple[np.ndarray, list[int], list[dict]]:
    """Embed ``rows``; returns (embeddings of the rows that loaded, their positions, error rows)."""
    dataset = ImageDataset(rows["path"].tolist(), backbone.preprocess)
    workers = cfg.resolved_workers()
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        num_workers=workers,
        collate_fn=collate_skip_errors,
        pin_memory=backbone.device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
    embs, ok, errors = [], [], []
    with feature_maps_kept():
        for idx, batch, errs in loader:
            for i, reason in errs:
                errors.append({"path": str(rows["path"].iloc[i]), "id": str(rows["id"].iloc[i]), "stage": "image",
                               "reason": reason})
            if batch is not None and len(idx):
                embs.append(backbone.embed(batch.to(backbone.device, non_blocking=True)))
                ok.extend(idx)
            if bar is not None:
                bar.update(len(idx) + len(errs))
    emb = np.concatenate(embs) if embs else np.zeros((0, backbone.dim), np.float32)
    return emb, ok, errors


def check_plan(bundle: Bundle, fingerprint: str, shard_rows: int) -> None:
    """Refuse to resume a bundle against another input (or shard size) than the one its plan records.

    The plan itself is recorded by the pipeline (the only writer of ``manifest.json``), before any shard."""
    plan = bundle.manifest.get("plan", {}).get(STAGE)
    if plan and (plan["fingerprint"] != fingerprint or plan["shard_rows"] != shard_rows):
        raise BundleError(
            f"{bundle.root}: an unfinished or finished build of a different manifest (or shard size) is here; "
            "resume with the same input and --shard-size, or choose another --out"
        )


def finished(bundle: Bundle) -> tuple[list[Path], dict[str, Any]]:
    """Every finished shard's files, and the stage's info from their markers."""
    shards = finished_shards(bundle)
    markers = [read_json(marker_path(p)) for p in shards]
    info = {
        "shards": len(shards),
        "ok": sum(m["ok"] for m in markers),
        "failed": sum(m["failed"] for m in markers),
        "images_per_s": _overall_rate(markers),
    }
    return [p for s in shards for p in (s, marker_path(s))], info


def ingest_embeddings(bundle: Bundle, table: EmbeddingTable, cfg: EmbedConfig = EmbedConfig(),
                      progress: bool = True, first_shard: int = 0,
                      seen: set[str] | None = None) -> tuple[list[Path], dict[str, Any]]:
    """Precomputed embeddings into shards, piece by piece, with an error row per bad input row; resumable.

    Shard i holds piece i of the source (at most ``shard_rows`` input rows).
    Finished shards are not written again, but every piece is still read and
    checked, so a duplicate id is caught against all earlier rows.
    """
    bar = progress_bar(table.rows, "embeddings in", unit="row", show=progress)
    first = 0
    t0 = time.perf_counter()
    for i, piece in enumerate(table.pieces(cfg.shard_rows, seen), start=first_shard):
        if not marker_path(shard_path(bundle, i)).exists():
            write_shard(bundle, i, piece.meta, piece.emb, {
                "first_row": first, "rows": piece.rows, "failed": len(piece.errors),
                "seconds": round(time.perf_counter() - t0, 3), "errors": piece.errors})
        first += piece.rows
        bar.update(piece.rows)
        del piece
        release_unused()  # each piece's Arrow and NumPy buffers go back before the next is read
        t0 = time.perf_counter()
    bar.close()
    return finished(bundle)


def run_embedding_stage(bundle: Bundle, df: pd.DataFrame, backbone: Backbone, cfg: EmbedConfig = EmbedConfig(),
                        progress: bool = True, first_shard: int = 0) -> tuple[list[Path], dict[str, Any]]:
    """Embed every manifest row not yet in a finished shard; returns (every finished shard's files, stage info).

    ``first_shard`` > 0 numbers the shards after a bundle's own (``geo add``).
    """
    todo, done_rows = pending_shards(bundle, len(df), cfg.shard_rows, first_shard)
    bar = progress_bar(len(df), "embed", unit="img", initial=done_rows, show=progress)
    for i in todo:
        embed_shard(bundle, df, i, first_shard, backbone, cfg, bar)
    bar.close()
    return finished(bundle)


def pending_shards(bundle: Bundle, rows: int, shard_rows: int, first_shard: int = 0) -> tuple[list[int], int]:
    """(shard numbers, counted from the manifest's first row, that have no marker yet; rows already done)."""
    n_shards = max(1, -(-rows // shard_rows))
    todo = [i for i in range(n_shards) if not marker_path(shard_path(bundle, first_shard + i)).exists()]
    done = sum(min(shard_rows, rows - i * shard_rows) for i in range(n_shards) if i not in todo)
    return todo, done


def embed_shard(bundle: Bundle, df: pd.DataFrame, i: int, first_shard: int, backbone: Backbone, cfg: EmbedConfig,
                bar: tqdm | None = None) -> int:
    """Embed rows [i * shard_rows, (i + 1) * shard_rows) of the manifest into shard ``first_shard + i`` and its
    marker; returns the rows done. The one way a shard is made, in one process or on a cluster's actor."""
    rows = df.iloc[i * cfg.shard_rows:(i + 1) * cfg.shard_rows]
    t0 = time.perf_counter()
    emb, ok, errors = _embed_rows(rows, backbone, cfg, bar)
    seconds = time.perf_counter() - t0
    write_shard(bundle, first_shard + i, rows.iloc[ok], emb, {
        "first_row": i * cfg.shard_rows, "rows": len(rows), "failed": len(errors), "seconds": round(seconds, 3),
        "images_per_s": round(len(rows) / seconds, 2) if seconds else None, "errors": errors,
    })
    return len(rows)


def _overall_rate(markers: list[dict]) -> float | None:
    secs = sum(m["seconds"] for m in markers)
    return round(sum(m["rows"] for m in markers) / secs, 2) if secs else None
