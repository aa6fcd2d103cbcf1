"""The predictions schema: one file format for `geo query --out` and `geo bench --out`."""
from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from geo.store.predictions import (
    COLUMNS,
    SCHEMA,
    PredictionsError,
    ShardedWriter,
    answers_to_frame,
    read_predictions,
    read_scored_file,
    write_predictions,
)


def _answers():
    return [
        {"image": "a.jpg", "lat": 48.85, "lon": 2.35, "confidence": 0.9, "mode": "knn",
         "top_cells": [{"partition": "p", "token": "47e66", "prob": 0.7, "lat": 48.8, "lon": 2.3}],
         "neighbors": [{"id": "n1", "path": "x.jpg", "lat": 48.9, "lon": 2.4, "similarity": 0.8, "distance_km": 6.0}],
         "error": None},
        {"image": "b.jpg", "lat": None, "lon": None, "confidence": None, "error": "cannot identify image file"},
    ]


def test_answers_round_trip_through_parquet(tmp_path):
    df = answers_to_frame(_answers(), ["a", "b"], [(48.86, 2.35), (0.0, 0.0)], mode="fused", suite="custom",
                          index_id="idx", extra={"scene": ["urban", None]})
    out = write_predictions(tmp_path / "p.parquet", df)
    assert pq.read_schema(out).names[: len(COLUMNS)] == COLUMNS
    assert pq.read_schema(out).field("created").type == SCHEMA.field("created").type
    back = read_predictions(out)
    a, b = back.iloc[0], back.iloc[1]
    assert a["mode"] == "knn"  # the answer's own mode wins over the requested one
    assert a["error_km"] == pytest.approx(1.112, abs=0.01)
    assert json.loads(a["topk"])[0]["id"] == "n1" and json.loads(a["top_cells"])[0]["token"] == "47e66"
    assert b["error"] == "cannot identify image file" and pd.isna(b["pred_lat"]) and pd.isna(b["error_km"])
    assert a["scene"] == "urban" and a["suite"] == "custom"


def test_query_without_truth_writes_the_same_schema(tmp_path):
    df = answers_to_frame(_answers()[:1])
    write_predictions(tmp_path / "q.parquet", df)
    back = read_predictions(tmp_path / "q.parquet")
    assert back["query_id"].tolist() == ["a.jpg"] and back["error_km"].isna().all()


def test_sharded_writer_resumes_and_merges(tmp_path):
    out = tmp_path / "run.parquet"
    w = ShardedWriter(out)
    w.append(answers_to_frame(_answers()[:1], ["a"], [(48.86, 2.35)]))
    assert ShardedWriter(out).done_keys() == {("a", "knn")}  # a new process sees the shard
    w.append(answers_to_frame(_answers()[1:], ["b"], [(0.0, 0.0)], mode="cells"))
    merged = w.finish()
    assert sorted(merged["query_id"]) == ["a", "b"] and out.exists() and not w.parts.exists()
    assert ShardedWriter(out).done_keys() == {("a", "knn"), ("b", "cells")}


def test_sharded_writer_keys_rows_by_photo_and_mode(tmp_path):
    """One photo answered in two modes is two rows; the same (photo, mode) written again keeps the last."""
    out = tmp_path / "run.parquet"
    w = ShardedWriter(out)
    w.append(answers_to_frame(_answers()[1:], ["b"], [(0.0, 0.0)], mode="cells"))
    w.append(answers_to_frame(_answers()[1:], ["b"], [(0.0, 0.0)], mode="gallery"))
    w.append(answers_to_frame(_answers()[:1] * 2, ["a", "b"], [(48.86, 2.35)] * 2))
    w.append(answers_to_frame(_answers()[1:], ["a"], [(48.86, 2.35)], mode="knn"))  # ("a", "knn") again, failed
    merged = w.finish()
    assert sorted(zip(merged["query_id"], merged["mode"])) == [("a", "knn"), ("b", "cells"), ("b", "gallery"),
                                                                 ("b", "knn")]
    assert merged.loc[(merged["query_id"] == "b") & (merged["mode"] == "knn"), "error"].isna().all()
    assert merged.loc[(merged["query_id"] == "a"), "error"].tolist() == ["cannot identify image file"]


def test_bad_coordinates_are_named_by_row(tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text("img_id,gt_lat,gt_long,predicted_lat,predicted_long\n"
                 "ok.jpg,1,2,3,4\nx.jpg,1,2,,4\ny.jpg,1,abc,3,4\nz.jpg,95,2,3,4\n")
    with pytest.raises(PredictionsError) as e:
        read_scored_file(f)
    msg = str(e.value)
    assert "bad.csv" in msg and "3 row(s)" in msg
    assert "line 3 (x.jpg: predicted_lat=''" in msg and "line 4 (y.jpg: gt_long='abc')" in msg
    assert "line 5 (z.jpg: gt_lat='95')" in msg


def test_columns_are_detected_or_given(tmp_path):
    f = tmp_path / "osv.csv"
    f.write_text("id,latitude,longitude,pred_latitude,pred_longitude\n7,10,20,10,20\n")
    df, footer = read_scored_file(f)
    assert footer is None and df["error_km"].iloc[0] == 0.0 and df["query_id"].iloc[0] == "7"
    g = tmp_path / "odd.csv"
    g.write_text("name,y,x,py,px\nq,10,20,11,20\n")
    with pytest.raises(PredictionsError, match="cannot find columns for true_lat"):
        read_scored_file(g)
    df, _ = read_scored_file(g, {"true_lat": "y", "true_lon": "x", "pred_lat": "py", "pred_lon": "px"})
    assert df["error_km"].iloc[0] == pytest.approx(111.19, abs=0.01)
    with pytest.raises(PredictionsError, match="'nope'"):
        read_scored_file(g, {"true_lat": "nope"})


def test_not_a_predictions_file(tmp_path):
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "x.parquet")
    with pytest.raises(PredictionsError, match="missing columns query_id"):
        read_predictions(tmp_path / "x.parquet")
    with pytest.raises(PredictionsError, match="no such"):
        read_predictions(tmp_path / "none.parquet")
