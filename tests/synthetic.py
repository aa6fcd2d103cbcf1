"""Synthetic galleries of precomputed embeddings, and the tiny model said to have made them (for tests)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from geo.core.geodesy import latlon_to_xyz
from geo.data.images import Preprocess
from geo.models.registry import Backbone, register_backbone

DIM = 24
CITIES = [(48.85, 2.35), (40.71, -74.0), (35.68, 139.69), (-33.87, 151.21), (-22.9, -43.2), (30.04, 31.24)]


def _toy_backbone(spec: str, weights: str | None, cache_dir: str | None) -> Backbone:
    """A tiny deterministic image model: what 'the model that made the embeddings' stands for in these tests."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, DIM))
    pre = Preprocess(size=32, resize=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return Backbone("toy24", DIM, pre, model, {"kind": "random", "source": "test", "path": None, "sha256": None})


register_backbone("toy24", _toy_backbone, "a tiny test model (24-d)")


def synthetic_gallery(n: int = 120, seed: int = 0) -> pd.DataFrame:
    """Photos around six cities by twelve photographers; embeddings know the city."""
    rng = np.random.default_rng(seed)
    city = rng.integers(0, len(CITIES), n)
    lat = np.array([CITIES[c][0] for c in city]) + rng.normal(0, 0.2, n)
    lon = np.array([CITIES[c][1] for c in city]) + rng.normal(0, 0.2, n)
    emb = latlon_to_xyz(lat, lon) @ rng.normal(size=(3, DIM)) * 3 + rng.normal(size=(n, DIM))
    return pd.DataFrame({"id": [f"p{i}" for i in range(n)], "lat": lat, "lon": lon,
                         "AUTHOR": [f"a{i % 12}" for i in range(n)], "caption": [f"photo {i}" for i in range(n)],
                         "embedding": list(emb.astype(np.float32))})


def write_embeddings(df: pd.DataFrame, path: Path) -> Path:
    table = pa.Table.from_pandas(df.drop(columns=["embedding"]), preserve_index=False)
    table = table.append_column("embedding", pa.array([list(map(float, e)) if e is not None else None
                                                        for e in df["embedding"]], pa.list_(pa.float32())))
    pq.write_table(table, path)
    return path


def config_file(path: Path, settings: dict) -> Path:
    """A `geo build-index --config` file: the tuned constants a fast test build shrinks (shards, epochs)."""
    path.write_text(json.dumps(settings))
    return path


def textured(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image (smooth gradients + blocks + noise) so resizes and crops are non-trivial."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(x / (17 + 5 * seed) + c) * np.cos(y / (23 + 3 * seed) - c) for c in range(3)], -1)
    for _ in range(6):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        base[y0:y0 + height // 4, x0:x0 + width // 4] = rng.integers(0, 256, 3)
    base += rng.normal(0, 8, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
