"""The large-gallery path, shrunk: trained stages on a bounded sample, fusion from the built stages."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from synthetic import synthetic_gallery

from geo.core.geodesy import haversine_km
from geo.pipeline import build_from_embeddings
from geo.settings import StageConfigs
from geo.query.index import open_index
from geo.stages.fusion.stage import FusionConfig
from geo.stages.gallery.stage import GalleryConfig
from geo.store.bundle import read_json
from geo.store.embeddings import EmbeddingReader

N, SAMPLE = 720, 300


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    df = synthetic_gallery(N, seed=3)
    df["AUTHOR"] = [f"a{i % 40}" for i in range(N)]
    rng = np.random.default_rng(7)  # spread out, so that photos of two photographers are rarely within 1 km
    df["lat"] = np.clip(df["lat"] + rng.normal(0, 3, N), -89, 89)
    df["lon"] = df["lon"] + rng.normal(0, 3, N)
    # each photo twice (same photographer, another id): a query that could see its own photographer's rows
    # would find its twin at 0 km
    both = pd.concat([df, df.assign(id=[f"t{i}" for i in range(N)])]).reset_index(drop=True)
    both["path"] = both["id"]
    emb = np.stack(both.pop("embedding")).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    configs = StageConfigs(fusion=FusionConfig(single_split_above=500), gallery=GalleryConfig(epochs=2),
                           train_photos=SAMPLE)
    root = tmp_path_factory.mktemp("large") / "bundle"
    bundle = build_from_embeddings(root, {"name": "toy24", "dim": emb.shape[1]}, both, emb, configs)
    return bundle, both, emb


def test_trained_stages_hold_a_sample_while_tables_points_and_index_use_every_photo(large):
    bundle, meta, _ = large
    cells = bundle.stage("cells")
    assert cells["photos"] == 2 * N and cells["trained_on"] == SAMPLE
    gallery = read_json(bundle.path("gallery/gallery.json"))
    places = len(np.unique(np.round(meta[["lat", "lon"]].to_numpy(), 5), axis=0))
    assert gallery["n_points"] == places  # points from every photo's place, not the sample's
    assert gallery["train"]["n"] == SAMPLE
    assert bundle.stage("knn_index")["ntotal"] == 2 * N == EmbeddingReader(bundle).count


def test_fusion_scores_held_out_photographers_without_their_own_rows(large):
    bundle, meta, emb = large
    fusion = read_json(bundle.path("fusion/fusion.json"))
    assert fusion["how"].startswith("built stages") and fusion["folds"] == 1
    assert 20 <= fusion["n_validation"] < len(meta)
    # Each query's twin (same embedding, same place, same photographer) is in the index. kNN answers a
    # neighbour's place, and no photo has another photographer's photo within 1 km: so kNN is right within
    # 1 km only if a query found its own photographer's rows. (Without the exclusion: all of them.)
    lat, lon = meta["lat"].to_numpy()[:N], meta["lon"].to_numpy()[:N]
    author = meta["AUTHOR"].to_numpy()[:N]
    near = haversine_km(lat[:, None], lon[:, None], lat[None], lon[None]) <= 1
    assert not (near & (author[:, None] != author[None])).any()
    assert fusion["single_modes"]["knn"]["1"] == 0.0
    index = open_index(bundle.root)
    ans = index.locate_embeddings(emb[:20], mode="fused")
    err = haversine_km([a.lat for a in ans], [a.lon for a in ans], meta["lat"][:20], meta["lon"][:20])
    assert np.all(np.isfinite(err))
