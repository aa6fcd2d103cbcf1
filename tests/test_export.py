"""geo export, the way back out (issue 27, finding 17), and one path from vectors to a bundle (finding 12): a
bundle built from photos and one built from the same vectors through --embeddings fit the same parameters and give
the same answers, and a photo asked as an image answers as its embedding does."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from synthetic import CITIES, DIM, config_file, textured, write_embeddings  # noqa: F401  (registers the toy24 backbone)
from typer.testing import CliRunner

from geo.cli import app
from geo.data.embedding_table import EmbeddingTable
from geo.query.index import open_index
from geo.store.bundle import open_bundle
from geo.store.embeddings import EmbeddingReader

SETTINGS = {"embed": {"shard_rows": 16}, "gallery": {"epochs": 2}}


def invoke(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def photo_built(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """(bundle built from 54 photos with the toy model, its temp folder, 3 query photos not in it)."""
    tmp = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(57):
        city = i % len(CITIES)
        path = tmp / f"p{i}.jpg"
        textured(96, 72, seed=city * 7 + i % 3).save(path)
        rows.append({"id": f"p{i}", "path": str(path), "lat": CITIES[city][0] + rng.normal(0, 0.2),
                     "lon": CITIES[city][1] + rng.normal(0, 0.2), "AUTHOR": f"a{i % 9}"})
    pd.DataFrame(rows[:54]).to_csv(tmp / "photos.csv", index=False)
    r = invoke("build-index", tmp / "photos.csv", "--backbone", "toy24", "--out", tmp / "bundle", "--workers", 0,
               "--config", config_file(tmp / "c.json", SETTINGS), "-q")
    assert r.exit_code == 0, r.output
    return tmp / "bundle", tmp, [row["path"] for row in rows[54:]]


@pytest.mark.parametrize("form", ["parquet", "clip-retrieval"])
def test_an_export_reads_back_as_the_same_vectors_and_columns(photo_built, tmp_path, form):
    bundle, _, _ = photo_built
    r = invoke("export", bundle, tmp_path / "out", "--format", form)
    assert r.exit_code == 0 and "54 embeddings (24-d, backbone toy24)" in r.output, r.output
    if form == "clip-retrieval":
        assert sorted(p.name for p in (tmp_path / "out" / "img_emb").iterdir())[:2] == ["img_emb_0.npy", "img_emb_1.npy"]
        assert np.load(tmp_path / "out" / "img_emb" / "img_emb_0.npy").dtype == np.float32
    meta, emb = EmbeddingReader(open_bundle(bundle)).read()
    pieces = list(EmbeddingTable(tmp_path / "out").pieces())
    back = pd.concat([p.meta for p in pieces], ignore_index=True)
    assert not any(p.errors for p in pieces)
    assert back["id"].tolist() == meta["id"].tolist() and back["AUTHOR"].tolist() == meta["AUTHOR"].tolist()
    np.testing.assert_array_equal(back[["lat", "lon"]].to_numpy(), meta[["lat", "lon"]].to_numpy())
    np.testing.assert_allclose(np.concatenate([p.emb for p in pieces]), emb, atol=1e-6)


def _fitted(bundle: Path) -> dict:
    """What a build fitted, without timings: fusion's choices (the backed-off modes' weights and decisions: their
    calibration maps sit on similarities that the vectors' float32 round trip moves in the 7th digit), the cells'
    partition and the gallery's points."""
    m = json.loads((bundle / "manifest.json").read_text())
    params = m["stages"]["fusion"]["params"]
    backed_off = {m: {k: v[k] for k in ("signals", "decision")} for m, v in params["mode_fusion"].items()}
    return {"signals": params["signals"], "decision": params["decision"], "mode_fusion": backed_off,
            "cells": m["stages"]["cells"]["cells"], "group": m["stages"]["cells"]["group_column"],
            "points": m["stages"]["gallery"]["n_points"], "reranked": "fusion/rerank.json" in m["files"]}


def test_photos_and_their_vectors_build_the_same_bundle_and_answers(photo_built):
    bundle, tmp, queries = photo_built
    assert invoke("export", bundle, tmp / "vectors").exit_code == 0
    r = invoke("build-index", "--embeddings", tmp / "vectors", "--backbone", "toy24", "--out", tmp / "from-vectors",
               "--config", config_file(tmp / "c.json", SETTINGS), "-q")
    assert r.exit_code == 0, r.output
    assert _fitted(bundle) == _fitted(tmp / "from-vectors")
    assert _fitted(bundle)["group"] == "AUTHOR"

    index = open_index(bundle)
    emb, errors = index.embed(queries)
    assert not errors
    q = pd.DataFrame({"id": [Path(p).stem for p in queries], "lat": 0.0, "lon": 0.0, "embedding": list(emb[:, 0])})
    src = write_embeddings(q, tmp / "queries.parquet")
    for mode in index.modes:
        as_images = [json.loads(x) for x in invoke("query", *queries, "--index", bundle, "--mode", mode,
                                                   "--json").stdout.splitlines()]
        for other in (bundle, tmp / "from-vectors"):
            as_vectors = [json.loads(x) for x in invoke("query", "--embeddings", src, "--index", other, "--mode",
                                                        mode, "--json").stdout.splitlines()]
            for a, b in zip(as_images, as_vectors, strict=True):
                assert (a["lat"], a["lon"]) == pytest.approx((b["lat"], b["lon"]), abs=1e-4), (mode, other)
                assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-4), (mode, other)
                assert a["place"] == b["place"] and a["city"] == b["city"], (mode, other)
