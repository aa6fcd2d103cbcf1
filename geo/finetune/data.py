"""What a run learns from: the manifest's photos, their split by photographer, their pixels and their cells.

Why in two steps: :func:`read_photos` reads and splits the manifest before any model loads (a manifest
without enough photos or photographers fails in a second), and :func:`prepare` decodes the pixels through the
backbone's own preprocessing, so the model learns from exactly the pixels a query will show it, then draws
the cells from the training photos alone (validation photos must not shape the classes they are scored on).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from geo.core.geodesy import latlon_to_xyz
from geo.core.progress import bar
from geo.core.splits import group_column, validation_mask
from geo.data.images import ImageDataset
from geo.data.manifest import ManifestError, read_manifest
from geo.finetune.config import FinetuneConfig
from geo.models.backbones import Backbone
from geo.stages.cells.partition import Partition, build_partitions, cell_table, default_taus, locate
from geo.stages.cells.train import smoothed_targets

if TYPE_CHECKING:
    import pandas as pd

Log = Callable[[str], None]
MIN_PHOTOS = 8


@dataclass(frozen=True)
class Photos:
    """The manifest's rows and which of them validation holds out (whole photographers when a column says who)."""
    source: str
    df: pd.DataFrame
    lat: np.ndarray
    lon: np.ndarray
    group_column: str | None
    groups: np.ndarray | None
    held: np.ndarray  # bool per row: a validation photo

    def digest(self) -> str:
        """The photos' identity for the resume fingerprint: ids and coordinates, in order."""
        return hashlib.sha256(json.dumps([self.df["id"].astype(str).tolist(), self.lat.tolist(),
                                          self.lon.tolist()]).encode()).hexdigest()


def read_photos(manifest: str, cfg: FinetuneConfig) -> Photos:
    """The manifest's usable rows, split into training and validation the way the build splits (seeded)."""
    man = read_manifest(manifest, cfg.image_root)
    df = man.df.reset_index(drop=True)
    if len(df) < MIN_PHOTOS:
        raise ManifestError(f"{man.source}: {len(df)} usable photos; fine-tuning needs at least {MIN_PHOTOS}")
    col = group_column(df.columns, cfg.group_column)
    groups = df[col].astype(str).to_numpy() if col else None
    held = validation_mask(len(df), groups, cfg.val_fraction, cfg.seed)
    if not held.any() or held.all():
        raise ManifestError(f"{man.source}: cannot hold out photographers for validation ({col or 'no group column'})")
    return Photos(str(man.source), df, df["lat"].to_numpy(np.float64), df["lon"].to_numpy(np.float64), col,
                  groups, held)


@dataclass(frozen=True)
class TrainingData:
    """Everything the trainer reads: pixels (float16, in memory), row numbers of the training and validation
    photos that decoded, the cells and each photo's smoothed targets over them, and unit vectors of the truth."""
    photos: Photos
    images: torch.Tensor
    train: np.ndarray
    val: np.ndarray
    usable: np.ndarray  # the rows that decoded, training and validation, in manifest order
    failed: list[tuple[int, str]]
    parts: list[Partition]
    targets: list[torch.Tensor]  # per partition: (photos, cells) haversine-smoothed target distributions
    xyz: torch.Tensor  # (photos, 3) float32: each photo's place on the unit sphere


def _decode(paths: list[str], bb: Backbone, log: Log) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
    """Every photo once, through the query's own preprocessing (float16 in memory); failures reported."""
    ds = ImageDataset(paths, bb.preprocess, crops=1)
    size = bb.preprocess.size
    out = torch.zeros((len(paths), 3, size, size), dtype=torch.float16)
    ok, failed = [], []
    progress = bar(len(paths), "decode", "img")
    for i in range(len(paths)):
        _, t, reason = ds[i]
        if t is None:
            failed.append((i, reason))
        else:
            out[i] = t[0].half()
            ok.append(i)
        progress.update(1)
    progress.close()
    for i, reason in failed[:5]:
        log(f"finetune: {paths[i]}: {reason}")
    return out, ok, failed


def _cell_targets(photos: Photos, train: np.ndarray, cfg: FinetuneConfig
                  ) -> tuple[list[Partition], list[torch.Tensor], torch.Tensor]:
    """Cells from the training photos only, and every photo's targets against each cell's centre (its training
    photos' spherical mean, Class2GPS, as in the cells stage), smoothed by distance (PIGEON)."""
    lat, lon = photos.lat, photos.lon
    tau_min, tau_max = default_taus(len(train))
    parts = build_partitions(lat[train], lon[train], tau_min, tau_max, cfg.partitioner, seed=cfg.seed)
    located = locate(parts, lat[train], lon[train])
    photo_xyz = torch.from_numpy(latlon_to_xyz(lat, lon))
    targets = []
    for k, p in enumerate(parts):
        table = cell_table(p, located[:, k], lat[train], lon[train], {}, {})
        centres = latlon_to_xyz(table["lat"].to_numpy(np.float64), table["lon"].to_numpy(np.float64))
        targets.append(smoothed_targets(photo_xyz, torch.from_numpy(centres), cfg.smoothing_km).float())
    return parts, targets, photo_xyz.float()


def prepare(photos: Photos, bb: Backbone, cfg: FinetuneConfig, log: Log) -> TrainingData:
    """Decode the photos for ``bb`` and draw the cells; a photo that fails to decode leaves both splits."""
    images, ok, failed = _decode(photos.df["path"].tolist(), bb, log)
    decoded = np.zeros(len(photos.df), bool)
    decoded[ok] = True
    train, val = np.flatnonzero(decoded & ~photos.held), np.flatnonzero(decoded & photos.held)
    if len(train) < MIN_PHOTOS // 2 or len(val) < 1:
        raise ManifestError(f"{photos.source}: {len(train)} training and {len(val)} validation photos decode; too few")
    parts, targets, xyz = _cell_targets(photos, train, cfg)
    return TrainingData(photos, images, train, val, np.flatnonzero(decoded), failed, parts, targets, xyz)
