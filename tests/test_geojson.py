"""GeoJSON output: a FeatureCollection GIS tools open as it is, from `geo query --format geojson` and `geo bench`."""
from __future__ import annotations

import json

import pytest

from geo.store.geojson import feature_collection, write_geojson
from geo.store.predictions import answers_to_frame


def _answers():
    return [
        {"image": "a.jpg", "lat": 48.85, "lon": 2.35, "confidence": 0.6, "confidence_radius_km": 25.0, "mode": "fused",
         "p_within": {"25": 0.6, "750": 0.9}, "alternatives": [{"lat": 45.76, "lon": 4.84, "score": 0.2},
                                                               {"lat": 43.3, "lon": 5.37, "score": 0.1}],
         "top_cells": [], "neighbors": [], "error": None},
        {"image": "b.jpg", "lat": None, "lon": None, "confidence": None, "error": "not an image"},
    ]


def test_features_are_answers_alternatives_and_truth_with_scalar_properties(tmp_path):
    df = answers_to_frame(_answers(), ["a", "b"], [(48.86, 2.35), (10.0, 20.0)])
    fc = feature_collection(df)
    assert fc["type"] == "FeatureCollection"
    roles = [(f["properties"]["query_id"], f["properties"]["role"]) for f in fc["features"]]
    assert roles == [("a", "answer"), ("a", "alternative"), ("a", "alternative"), ("a", "truth"),
                     ("b", "answer"), ("b", "truth")]
    answer, alt1, _, truth, failed, _ = fc["features"]
    assert answer["geometry"] == {"type": "Point", "coordinates": [2.35, 48.85]}  # RFC 7946: lon, lat
    p = answer["properties"]
    assert p["confidence"] == 0.6 and p["confidence_radius_km"] == 25.0
    assert p["p_within_25km"] == 0.6 and p["p_within_750km"] == 0.9 and p["p_within_200km"] is None
    assert p["error_km"] == pytest.approx(1.112, abs=0.01) and p["true_lat"] == 48.86
    assert alt1["geometry"]["coordinates"] == [4.84, 45.76] and alt1["properties"]["rank"] == 1
    assert truth["geometry"]["coordinates"] == [2.35, 48.86]
    assert failed["geometry"] is None and failed["properties"]["error"] == "not an image"  # still counted
    for f in fc["features"]:  # GIS tools read scalar properties as columns
        assert all(v is None or isinstance(v, (str, int, float)) for v in f["properties"].values())
    out = write_geojson(tmp_path / "a.geojson", df)
    assert json.loads(out.read_text()) == json.loads(json.dumps(fc))


def test_query_format_geojson_and_out(cli_bundle, tmp_path):
    from pathlib import Path

    from typer.testing import CliRunner

    from geo.cli import app

    query = sorted((Path(__file__).resolve().parents[1] / "examples" / "osv5m" / "queries").glob("*.jpg"))[0]
    r = CliRunner().invoke(app, ["query", str(query), "missing.jpg", "--index", str(cli_bundle[1]), "--format",
                                 "geojson", "--out", str(tmp_path / "q.geojson")])
    assert r.exit_code == 3, r.output  # one input failed: said on stderr, the collection still holds both
    fc = json.loads(r.stdout)
    answers = [f for f in fc["features"] if f["properties"]["role"] == "answer"]
    assert [a["properties"]["path"] for a in answers] == [str(query), "missing.jpg"]
    assert answers[0]["geometry"]["type"] == "Point" and answers[1]["geometry"] is None
    assert json.loads((tmp_path / "q.geojson").read_text()) == fc
