"""`geo add`: photos appended to a bundle answer like a fresh build's, and what is left stale is said."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
from synthetic import config_file, synthetic_gallery, write_embeddings
from typer.testing import CliRunner

from geo.cli import app
from geo.query.index import open_index


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_add_then_query_equals_a_fresh_build(tmp_path):
    df = synthetic_gallery(150)
    first, rest = write_embeddings(df.head(100), tmp_path / "first.parquet"), write_embeddings(df.iloc[100:], tmp_path / "rest.parquet")
    everything = write_embeddings(df, tmp_path / "all.parquet")
    config = config_file(tmp_path / "c.json", {"gallery": {"epochs": 1}, "embed": {"shard_rows": 40}})
    common = ("--backbone", "toy24", "--config", config, "-q")
    grown, fresh = tmp_path / "grown", tmp_path / "fresh"
    assert invoke("build-index", "--embeddings", first, "--out", grown, *common).exit_code == 0
    assert invoke("build-index", "--embeddings", everything, "--out", fresh, "--skip", "cells", "--skip", "gallery",
                  "--skip", "fusion", *common).exit_code == 0  # the kNN answers are what a fresh build must match

    r = invoke("add", grown, "--embeddings", rest, "-q")
    assert r.exit_code == 0, r.output
    assert "150 photos indexed" in r.output
    a, b = open_index(grown), open_index(fresh)
    q = np.stack(df["embedding"].iloc[::7]).astype(np.float32)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    for x, y in zip(a.locate_embeddings(q, mode="knn"), b.locate_embeddings(q, mode="knn")):
        # the same neighbours at the same similarities; the answer itself differs by design: the grown bundle's
        # fusion tuned the kNN mode's back-off to the prior (and calibrates it), the fresh kNN-only bundle states
        # the raw vote
        assert [(n["id"], n["similarity"]) for n in x.neighbors] == [(n["id"], n["similarity"]) for n in y.neighbors]
        assert x.p_within and not y.p_within
    assert a.knn.ntotal == 150 and a.bundle.manifest["counts"]["ok"] == 150
    assert int(a.cells.tables[-1]["count"].sum()) <= 150 and len(a.gallery.points) > len(df.head(100))
    for mode in ("fused", "cells", "gallery"):  # every mode still answers
        assert all(x.error is None for x in a.locate_embeddings(q[:3], mode=mode))

    r = invoke("info", grown, "--verify")
    assert r.exit_code == 0 and "stale: cells, gallery, fusion" in r.output and "50 photos were added" in r.output
    r = invoke("add", grown, "--embeddings", rest)
    assert r.exit_code == 2 and "already added" in r.output


def test_duplicate_ids_are_error_rows_and_refit_clears_staleness(tmp_path):
    df = synthetic_gallery(120)
    base = write_embeddings(df.head(80), tmp_path / "base.parquet")
    more = df.iloc[70:].copy()  # ten ids the bundle already has
    extra = write_embeddings(more, tmp_path / "more.parquet")
    out = tmp_path / "b"
    assert invoke("build-index", "--embeddings", base, "--backbone", "toy24", "--out", out, "--config",
                  config_file(tmp_path / "c.json", {"gallery": {"epochs": 1}}), "--skip", "fusion",
                  "-q").exit_code == 0  # the refit's staleness is the trained stages'; fusion's is the same rule
    r = invoke("add", out, "--embeddings", extra, "--refit", "-q")
    assert r.exit_code == 0, r.output
    errors = pq.read_table(out / "errors.parquet").to_pandas()
    assert errors["reason"].str.contains("duplicate id").sum() == 10
    index = open_index(out)
    assert index.knn.ntotal == 120 and "stale" not in index.bundle.manifest
    assert index.bundle.manifest["stages"]["cells"]["photos"] == 120  # refitted on every photo
