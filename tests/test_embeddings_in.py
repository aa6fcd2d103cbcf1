"""Precomputed embeddings in: Parquet and clip-retrieval output to a full bundle, bad rows as error rows,
queries by embedding, resume."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from synthetic import DIM, config_file, synthetic_gallery, write_embeddings
from typer.testing import CliRunner

from geo.cli import app
from geo.data.embedding_table import EmbeddingTable, EmbeddingTableError
from geo.query.index import open_index
from geo.store.predictions import read_predictions


def invoke(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    tmp = tmp_path_factory.mktemp("emb")
    df = synthetic_gallery()
    src = write_embeddings(df, tmp / "gallery.parquet")
    out = tmp / "bundle"
    r = invoke("build-index", "--embeddings", src, "--backbone", "toy24", "--group", "AUTHOR", "--out", out,
               "--config", config_file(tmp / "c.json", {"gallery": {"epochs": 2}}), "-q")
    assert r.exit_code == 0, r.output
    return out, df


def test_full_bundle_from_precomputed_embeddings(built):
    out, df = built
    index = open_index(out)
    stages = index.bundle.manifest["stages"]
    assert {"embeddings", "knn_index", "cells", "gallery", "fusion"} <= set(stages)
    assert index.bundle.manifest["backbone"]["name"] == "toy24" and index.bundle.manifest["dim"] == DIM
    assert stages["cells"]["group_column"] == "AUTHOR"
    meta = pd.concat([pq.read_table(p).to_pandas() for p in sorted((out / "embeddings").glob("*.parquet"))])
    assert meta["id"].tolist() == df["id"].tolist()
    assert {"AUTHOR", "caption"} <= set(meta.columns)  # extra columns are kept
    stored = np.stack(meta["embedding"])
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1, atol=1e-5)  # L2-normalised on the way in
    # a gallery row asked as a query finds itself
    a = index.locate_embeddings(stored[:1], mode="knn", ids=["q"])[0]
    assert a.neighbors[0]["id"] == "p0" and a.id == "q" and "id" in a.to_dict() and "image" not in a.to_dict()


def test_query_by_embeddings_writes_predictions_in_input_order(built, tmp_path):
    out, df = built
    q = df.head(5).copy()
    q["id"] = [f"q{i}" for i in range(5)]
    q.loc[2, "embedding"] = np.full(DIM, np.nan, np.float32)  # a bad query row gets its error, the rest answers
    src = write_embeddings(q, tmp_path / "q.parquet")
    for mode in ("fused", "knn", "gallery", "cells"):
        preds = tmp_path / f"{mode}.parquet"
        r = invoke("query", "--embeddings", src, "--index", out, "--mode", mode, "--out", preds)
        assert r.exit_code == 3 and "1 of 5 inputs could not be answered: q2" in r.output, r.output
        p = read_predictions(preds)
        assert p["query_id"].tolist() == ["q0", "q1", "q2", "q3", "q4"]
        assert p["error"].notna().tolist() == [False, False, True, False, False]
        assert p.loc[[0, 1, 3, 4], "pred_lat"].notna().all() and np.isnan(p.loc[2, "pred_lat"])
        assert p.loc[[0, 1, 3, 4], "true_lat"].tolist() == pytest.approx(q.loc[[0, 1, 3, 4], "lat"].tolist())
        assert set(p["mode"].dropna()) == {mode}
    r = invoke("query", "--embeddings", src, "--index", out, "--json", "--mode", "knn")
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert [x["id"] for x in lines] == ["q0", "q1", "q2", "q3", "q4"] and "NaN" in lines[2]["error"]
    index = open_index(out)
    raw = np.stack(q.loc[[0, 1], "embedding"])
    direct = index.locate_embeddings(raw / np.linalg.norm(raw, axis=1, keepdims=True), mode="knn")
    assert [(x["lat"], x["lon"]) for x in lines[:2]] == [(a.lat, a.lon) for a in direct]


def test_each_kind_of_bad_row_is_an_error_row_and_the_build_completes(tmp_path):
    df = synthetic_gallery(60)
    bad = df.head(9).copy()
    bad["id"] = [f"bad{i}" for i in range(9)]
    bad["lat"] = bad["lat"].astype(object)
    bad.at[0, "embedding"] = np.full(DIM, np.nan, np.float32)
    bad.at[1, "embedding"] = np.r_[np.ones(DIM - 1), np.inf].astype(np.float32)
    bad.at[2, "embedding"] = np.zeros(DIM, np.float32)
    bad.at[3, "embedding"] = np.ones(DIM + 3, np.float32)  # wrong dimension
    bad.at[4, "lat"] = 91.0
    bad.at[5, "lon"] = np.nan  # missing longitude
    bad.at[6, "id"] = "p0"  # duplicate of a gallery id
    bad.at[7, "lat"] = "north"  # wrong type
    bad.at[8, "embedding"] = None  # no embedding at all
    rows = pd.concat([df, bad], ignore_index=True)
    rows["lat"] = rows["lat"].astype(str)  # one column type: numbers as text, and one word
    src = write_embeddings(rows, tmp_path / "mixed.parquet")
    out = tmp_path / "bundle"
    r = invoke("build-index", "--embeddings", src, "--backbone", "toy24", "--out", out, "--skip", "gallery",
               "--skip", "fusion", "-q")
    assert r.exit_code == 0, r.output
    assert "60 photos indexed, 9 failed" in r.output
    errors = pq.read_table(out / "errors.parquet").to_pandas()
    reasons = " | ".join(errors["reason"])
    for needle in ("NaN or infinite", "zero vector", f"{DIM + 3} values, expected {DIM}", "latitude 91.0 out of range",
                   "longitude nan is missing", "duplicate id 'p0'", "latitude 'north'", "no embedding"):
        assert needle in reasons, needle
    assert (errors["stage"] == "embedding").all() and len(errors) == 9


def test_clip_retrieval_output_reads_as_the_same_rows(tmp_path):
    df = synthetic_gallery(30)
    (tmp_path / "img_emb").mkdir()
    (tmp_path / "metadata").mkdir()
    for n, part in enumerate((df.iloc[:18], df.iloc[18:])):
        np.save(tmp_path / "img_emb" / f"img_emb_{n}.npy", np.stack(part["embedding"]).astype(np.float16))
        part.drop(columns=["embedding"]).to_parquet(tmp_path / "metadata" / f"metadata_{n}.parquet")
    table = EmbeddingTable(tmp_path)
    pieces = list(table.pieces(10))
    meta = pd.concat([p.meta for p in pieces])
    emb = np.concatenate([p.emb for p in pieces])
    assert meta["id"].tolist() == df["id"].tolist() and table.dim == DIM and table.rows == 30
    want = np.stack(df["embedding"]).astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(emb, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-6)
    (tmp_path / "metadata" / "metadata_1.parquet").unlink()
    with pytest.raises(EmbeddingTableError, match="pair up"):
        EmbeddingTable(tmp_path)


def test_pieces_are_the_same_whatever_size_the_batches_are_decoded_in(tmp_path, monkeypatch):
    """A piece is decoded a batch at a time (READ_ROWS) into one matrix; batches that straddle pieces, parts and
    bad rows (a null, a wrong length) give the same pieces as decoding each piece whole."""
    import geo.data.embedding_table as et

    df = synthetic_gallery(27)
    df.at[4, "embedding"] = None
    df.at[11, "embedding"] = np.ones(DIM + 2, np.float32)
    (tmp_path / "t").mkdir()
    write_embeddings(df.iloc[:16], tmp_path / "t" / "a.parquet")
    write_embeddings(df.iloc[16:], tmp_path / "t" / "b.parquet")

    def read(batch: int) -> list:
        monkeypatch.setattr(et, "READ_ROWS", batch)
        return list(EmbeddingTable(tmp_path / "t").pieces(7))

    whole, small = read(1 << 20), read(3)
    assert [p.rows for p in small] == [p.rows for p in whole] == [7, 7, 2, 7, 4]  # a part's last piece is short
    for a, b in zip(whole, small):
        assert a.meta.equals(b.meta) and np.array_equal(a.emb, b.emb) and a.errors == b.errors
    assert [e["reason"] for p in small for e in p.errors] == [
        "row 5: no embedding (null)", f"row 12: embedding has {DIM + 2} values, expected {DIM}"]


def test_unusable_sources_are_refused_by_name(tmp_path):
    with pytest.raises(EmbeddingTableError, match="no such file"):
        EmbeddingTable(tmp_path / "nope.parquet")
    pd.DataFrame({"id": ["a"], "lat": [1.0], "lon": [2.0], "embedding": ["not a vector"]}).to_parquet(tmp_path / "s.parquet")
    with pytest.raises(EmbeddingTableError, match="s.parquet: column 'embedding' is (large_)?string, not a list of floats"):
        list(EmbeddingTable(tmp_path / "s.parquet", dim=4).pieces())
    pd.DataFrame({"id": ["a"], "x": [1.0], "embedding": [[1.0, 2.0]]}).to_parquet(tmp_path / "c.parquet")
    with pytest.raises(EmbeddingTableError, match="c.parquet: no latitude/longitude"):
        EmbeddingTable(tmp_path / "c.parquet")
    r = invoke("build-index", "--embeddings", tmp_path / "c.parquet", "--backbone", "toy24", "--out", tmp_path / "b")
    assert r.exit_code == 2 and "c.parquet" in r.output


def test_interrupted_ingest_resumes_with_the_same_rows(built, tmp_path):
    _, df = built
    src = write_embeddings(df, tmp_path / "gallery.parquet")
    out = tmp_path / "bundle"
    args = ("build-index", "--embeddings", src, "--backbone", "toy24", "--out", out,
            "--config", config_file(tmp_path / "c.json", {"embed": {"shard_rows": 50}}), "--skip", "cells", "--skip", "gallery", "--skip", "fusion", "-q")
    assert invoke(*args).exit_code == 0
    first = pq.read_table(out / "embeddings" / "part-00001.parquet").to_pandas()
    (out / "embeddings" / "part-00001.json").unlink()  # killed before the second shard's marker
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    meta = pd.concat([pq.read_table(p).to_pandas() for p in sorted((out / "embeddings").glob("*.parquet"))])
    assert meta["id"].tolist() == df["id"].tolist() and meta["id"].is_unique
    again = pq.read_table(out / "embeddings" / "part-00001.parquet").to_pandas()
    np.testing.assert_array_equal(np.stack(again["embedding"]), np.stack(first["embedding"]))
    assert invoke("info", out, "--verify").exit_code == 0
    other = write_embeddings(df.head(40), tmp_path / "other.parquet")  # another source into the same bundle is refused
    r = invoke("build-index", "--embeddings", other, "--backbone", "toy24", "--out", out, "-q")
    assert r.exit_code == 2 and "different manifest" in r.output


def test_a_source_where_every_row_fails_is_refused_clearly(tmp_path):
    df = synthetic_gallery(10)
    df["embedding"] = [np.ones(DIM + 1, np.float32)] * 10  # every row of another model's dimension
    src = write_embeddings(df, tmp_path / "wrong.parquet")
    r = invoke("build-index", "--embeddings", src, "--backbone", "toy24", "--out", tmp_path / "b", "-q")
    assert r.exit_code == 2 and "no embeddings to index" in r.output
    errors = pq.read_table(tmp_path / "b" / "errors.parquet").to_pandas()
    assert len(errors) == 10 and errors["reason"].str.contains(f"{DIM + 1} values, expected {DIM}").all()


def test_bench_custom_scores_precomputed_queries(built, tmp_path):
    out, df = built
    q = df.iloc[::10].copy()
    q.loc[q.index[0], "embedding"] = np.zeros(DIM, np.float32)  # unusable: a failure, not a dropped row
    src = write_embeddings(q, tmp_path / "q.parquet")
    preds = tmp_path / "p.parquet"
    r = invoke("bench", "custom", "--embeddings", src, "--index", out, "--mode", "knn", "--json", "--no-ci",
               "--out", preds)
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["n"] == len(q) - 1 and s["n_failed"] == 1
    assert s["acc"]["25"] > 0.9  # gallery photos asked again: their own spot
    assert read_predictions(preds)["query_id"].tolist() == q["id"].tolist()
    r = invoke("bench", "im2gps3k", "--embeddings", src, "--index", out)
    assert r.exit_code == 2 and "geo bench custom" in r.output


def test_dry_run_plans_every_stage_and_the_memory_budget_is_enforced(built, tmp_path):
    out, df = built
    src = out.parent / "gallery.parquet"
    target = tmp_path / "never"
    r = invoke("build-index", "--embeddings", src, "--backbone", "toy24", "--out", target, "--dry-run")
    assert r.exit_code == 0, r.output
    for stage in ("embeddings", "knn_index", "cells", "gallery", "fusion"):
        assert f"{stage}:" in r.output, stage
    assert "Flat for 120 x 24 vectors" in r.output and "memory budget" in r.output
    assert "one process: peak ~" in r.output  # the stages run in one process: its peak is what must fit
    chosen = [line for line in r.output.splitlines() if line.strip().endswith("chosen")]
    assert len(chosen) == 1 and chosen[0].split()[0] == "Flat" and "build ~" in chosen[0]  # autofaiss-style table
    assert not target.exists()  # a dry run builds nothing
    r = invoke("build-index", "--embeddings", src, "--backbone", "toy24", "--out", target, "--memory", "64KB")
    assert r.exit_code == 2 and "raise --memory" in r.output and not (target / "manifest.json").exists()


def test_a_model_that_cannot_be_loaded_is_recorded_by_name_and_images_are_refused_clearly(tmp_path):
    src = write_embeddings(synthetic_gallery(20), tmp_path / "g.parquet")
    out = tmp_path / "b"
    r = invoke("build-index", "--embeddings", src, "--backbone", "somebody-elses-model", "--out", out, "-q")
    assert r.exit_code == 0, r.output
    assert open_index(out).bundle.manifest["backbone"]["name"] == "somebody-elses-model"
    photo = Path(__file__).resolve().parents[1] / "examples" / "osv5m" / "queries" / "1373307973052511.jpg"
    r = invoke("query", photo, "--index", out)
    assert r.exit_code == 2 and "geo query --embeddings" in r.output and "somebody-elses-model" in r.output
    r = invoke("query", "--embeddings", src, "--index", out, "--mode", "knn", "--json")
    assert r.exit_code == 0 and len(r.output.strip().splitlines()) == 20


def test_unit_rows_in_blocks_equal_one_division_and_survive_huge_values(monkeypatch):
    """Ingest normalises a piece a block of rows at a time (a float64 copy of a whole 50K x 1280 piece was
    most of a build's peak memory); the result must be the one-division result, and values whose squares
    overflow float32 must still normalise."""
    from geo.data import embedding_table as T

    monkeypatch.setattr(T, "NORM_ROWS", 3)
    rng = np.random.default_rng(0)
    vec = rng.normal(size=(10, 4)).astype(np.float32)
    vec[4] *= np.float32(1e30)
    out = T.unit_rows(vec)
    want = (vec / np.linalg.norm(vec.astype(np.float64), axis=1, keepdims=True)).astype(np.float32)
    assert out.dtype == np.float32 and np.array_equal(out, want)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    bad = vec.copy()
    bad[2, 1], bad[7] = np.nan, 0.0
    problems = T.vector_problems(bad)
    assert [i for i, p in enumerate(problems) if p] == [2, 7] and "NaN" in problems[2] and "zero" in problems[7]


def test_the_plan_predicts_one_process_peak_from_its_largest_stage():
    """--dry-run's peak is the process itself plus its largest stage (they run one at a time and hand back what
    they freed), so it grows with the gallery; benchmarks/RESULTS.md compares it with measured builds."""
    from geo.plan import PROCESS_BYTES, plan_build, process_peak

    def plans(n: int) -> list:
        return plan_build(n, 512, "64GB", 100_000, 100_000, 40, 50_000, 3, 10_000, 2_000,
                          ("knn_index", "cells", "gallery", "fusion"), 200_000, 50_000)

    small, big = plans(20_000), plans(1_000_000)
    assert process_peak(big) == PROCESS_BYTES + max(p.memory for p in big)
    assert process_peak(small) < process_peak(big)
    # a 1M x 512 IVF-Flat index (2 GB) is held by the kNN stage and again by fusion's scoring
    assert max(big, key=lambda p: p.memory).stage in ("knn_index", "fusion") and process_peak(big) > 2 * 2**30
