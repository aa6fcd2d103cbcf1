"""The realistic synthetic testbed's contract (benchmarks/realistic.py): what the accuracy claims stand on.

A small stand-in for YFCC26k (a few hundred photos by a few dozen photographers in real cities) keeps the
test fast and independent of the shared data; the generator takes it the way it takes the real file.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from geo.data.embedding_table import EmbeddingTable

_SPEC = importlib.util.spec_from_file_location(
    "realistic", Path(__file__).resolve().parents[1] / "benchmarks" / "realistic.py")
realistic = sys.modules.setdefault("realistic", importlib.util.module_from_spec(_SPEC))  # dataclasses look it up
_SPEC.loader.exec_module(realistic)

CITIES = [(48.857, 2.352), (40.713, -74.006), (35.690, 139.692), (-33.869, 151.209), (-22.907, -43.173),
          (51.507, -0.128), (41.902, 12.496), (37.775, -122.419), (30.044, 31.236), (19.076, 72.878)]


@pytest.fixture(scope="module")
def base() -> pd.DataFrame:
    """400 photos by 40 photographers, each photographer in one or two of the cities; scenes of all kinds."""
    rng = np.random.default_rng(5)
    author = rng.integers(0, 40, 400)
    home = rng.integers(0, len(CITIES), (40, 2))
    city = np.array(CITIES)[home[author, rng.integers(0, 2, 400)]]
    scene = rng.integers(0, 365, 400)
    return pd.DataFrame({"IMG_ID": [f"{i}.jpg" for i in range(400)], "AUTHOR": [f"p{a}" for a in author],
                         "LAT": city[:, 0] + rng.normal(0, 0.05, 400), "LON": city[:, 1] + rng.normal(0, 0.05, 400),
                         "S3_Label": scene % 3, "S365_Label": scene})


@pytest.fixture(scope="module")
def photos(base) -> pd.DataFrame:
    return realistic.generate(2000, seed=3, recipe=realistic.Recipe(dim=64), base=base)


def test_same_seed_same_photos_and_another_seed_others(base, photos):
    again = realistic.generate(2000, seed=3, recipe=realistic.Recipe(dim=64), base=base)
    other = realistic.generate(2000, seed=4, recipe=realistic.Recipe(dim=64), base=base)
    pd.testing.assert_frame_equal(photos.drop(columns="embedding"), again.drop(columns="embedding"))
    assert np.array_equal(np.stack(photos["embedding"]), np.stack(again["embedding"]))
    assert not np.allclose(np.stack(photos["embedding"]), np.stack(other["embedding"]))


def test_photo_count_unit_norms_and_float32(photos):
    emb = np.stack(photos["embedding"])
    assert set(realistic.COLUMNS) <= set(photos.columns)
    assert len(photos) == 2000 and emb.dtype == np.float32 and emb.shape[1] == 64
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert photos["id"].is_unique


def test_no_signal_share_is_what_was_asked(base):
    for share in (0.1, 0.25):
        df = realistic.generate(4000, seed=1, recipe=realistic.Recipe(dim=16, no_signal_share=share), base=base)
        assert abs((1 - df["signal"].mean()) - share) < 0.05
        assert set(df.loc[df["signal"] == 0, "finest"]) == {"none"}


def test_photographers_keep_their_real_places(base, photos):
    """Every photo lies within a day trip of one of its photographer's real photos."""
    for author, group in photos.groupby("AUTHOR"):
        real = base[base["AUTHOR"] == author]
        d = np.hypot(group["lat"].to_numpy()[:, None] - real["LAT"].to_numpy()[None, :],
                     group["lon"].to_numpy()[:, None] - real["LON"].to_numpy()[None, :]).min(axis=1)
        assert np.quantile(d, 0.9) < 2.0  # degrees: a few hundred km at most, never another city of the list


def test_bursts_are_near_duplicates_and_style_follows_the_photographer(photos):
    emb = np.stack(photos["embedding"])
    burst = photos["burst"].to_numpy()
    first = np.flatnonzero(np.r_[True, burst[1:] != burst[:-1]])
    pairs = first[(first + 1 < len(burst)) & (burst[np.minimum(first + 1, len(burst) - 1)] == burst[first])]
    assert np.mean(np.sum(emb[pairs] * emb[pairs + 1], axis=1)) > 0.9
    assert style_gap(photos) > 0.05


def style_gap(photos: pd.DataFrame) -> float:
    """Mean similarity of two photos in far-apart cities by one photographer, less that by two photographers:
    what the photographer's style alone adds (the places share nothing)."""
    emb, author = np.stack(photos["embedding"]), photos["AUTHOR"].to_numpy()
    lat, lon = photos["lat"].to_numpy(), photos["lon"].to_numpy()
    i, j = np.random.default_rng(0).integers(0, len(photos), (2, 40000))
    far = np.hypot(lat[i] - lat[j], lon[i] - lon[j]) > 20
    sim = np.sum(emb[i] * emb[j], axis=1)
    return float(sim[far & (author[i] == author[j])].mean() - sim[far & (author[i] != author[j])].mean())


def test_without_style_the_photographer_adds_nothing(base):
    """The check above can fail: a testbed without style shows no gap."""
    plain = realistic.generate(2000, seed=3, recipe=realistic.Recipe(dim=64, style_weight=0.0), base=base)
    assert abs(style_gap(plain)) < 0.03


def test_split_shares_no_photographer(photos):
    gallery, queries = realistic.split_by_photographer(photos, 300, seed=0)
    assert len(gallery) + len(queries) == len(photos)
    assert 150 <= len(queries) <= 300
    assert not set(gallery["AUTHOR"]) & set(queries["AUTHOR"])


def test_written_parquet_is_what_geo_reads(photos, tmp_path):
    path = tmp_path / "gallery.parquet"
    realistic.write_parquet(photos, path)
    table = EmbeddingTable(path)
    assert (table.lat_col, table.lon_col, table.id_col, table.dim) == ("lat", "lon", "id", 64)
    pieces = list(table.pieces())
    assert sum(len(p.meta) for p in pieces) == len(photos) and not any(p.errors for p in pieces)
    meta = pieces[0].meta
    assert "AUTHOR" in meta.columns and list(meta["id"][:3]) == list(photos["id"][:3])
    assert np.allclose(pieces[0].emb[:3], np.stack(photos["embedding"][:3]), atol=1e-6)
