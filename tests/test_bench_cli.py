"""`geo bench score`, `geo sql` and `geo report` through the typer app that `register` builds."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from geo.cli import app
from geo.eval.suites import shared_data_dir

RESULT = shared_data_dir() / "geoestimation" / "results" / "im2gps" / "ISNs_M-fstar-S3.csv"
needs_results = pytest.mark.skipif(not RESULT.is_file(), reason="shared GeoEstimation results not available")


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@needs_results
def test_score_json_reproduces_the_footer():
    r = _invoke("bench", "score", str(RESULT), "--json", "--no-ci", "--suite", "im2gps")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["n"] == 237 and s["footer"]["reproduced"] is True
    assert round(s["acc"]["25"], 6) == 0.43038 and round(s["mean_km"], 2) == 1732.86
    assert {"n", "acc", "median_km", "mean_km"} <= set(s) and set(s["by_scene"]) == {"indoor", "natural", "urban"}
    assert any(p["method"].startswith("GeoEstimation") for p in s["published"])


def test_score_bad_rows_are_named(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("query_id,true_lat,true_lon,pred_lat,pred_lon\na,1,2,3,4\nb,1,2,north,4\n")
    r = _invoke("bench", "score", str(f))
    assert r.exit_code == 2
    assert "p.csv" in r.output and "line 3 (b: pred_lat='north')" in r.output


@needs_results
def test_sql_and_report_on_converted_results(tmp_path):
    preds = tmp_path / "isns.parquet"
    r = _invoke("bench", "score", str(RESULT), "--suite", "im2gps", "--no-ci", "--out", str(preds), "--json")
    assert r.exit_code == 0, r.output

    r = _invoke("sql", "SELECT count(*) AS n, sum((error_km <= 25)::INT) AS city FROM predictions",
                "--predictions", str(preds), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == [{"n": 237, "city": 102}]  # 0.43038 * 237
    r = _invoke("sql", "SELECT scene, count(*) n FROM predictions GROUP BY 1 ORDER BY 1", "-p", str(preds), "--csv")
    assert r.stdout.splitlines()[0] == "scene,n" and len(r.stdout.splitlines()) == 4
    r = _invoke("sql", "SELECT nope FROM predictions", "-p", str(preds))
    assert r.exit_code == 2 and "query failed" in r.output

    out = tmp_path / "report"
    r = _invoke("report", str(preds), "--out", str(out), "--top", "3", "--no-ci")
    assert r.exit_code == 0, r.output
    for name in ("report.html", "errors_hist.png", "errors_map.png", "report.json"):
        assert (out / name).stat().st_size > 1000, name
    assert (out / "errors_map.png").read_bytes()[:4] == b"\x89PNG"
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and 'src="http' not in html  # self-contained
    assert "best 3:" in r.stdout and "worst 3:" in r.stdout and "Europe" in r.stdout
    a = json.loads((out / "report.json").read_text())
    assert sum(g["n"] for g in a["by_continent"].values()) == 237
    assert 0.5 < a["country_hit_rate"] <= 1.0
    assert a["country_hit_rate"] == a["summary"]["country"]["acc"]  # one rule for countries, as in geo bench
    by = {k: g for k, g in a["by_country"].items() if g["country_acc"] is not None}  # truth at sea: no country
    assert sum(g["country_acc"] * g["n"] for g in by.values()) == pytest.approx(
        a["country_hit_rate"] * sum(g["n"] for g in by.values()), abs=1e-6)
    assert "right country %" in html
    assert any(line.startswith("country") and line.rstrip().endswith("country") for line in r.stdout.splitlines())


def test_report_compares_modes_given_one_file_per_mode(tmp_path):
    from geo.store.predictions import answers_to_frame, write_predictions

    truth = [(48.85, 2.35), (40.71, -74.0), (35.68, 139.69), (-33.87, 151.21)]
    for mode, shift in (("fused", 0.05), ("knn", 5.0)):  # fused within 25 km of every photo, knn never
        answers = [{"image": f"{i}.jpg", "lat": la + shift, "lon": lo, "mode": mode, "error": None,
                    "confidence": 0.9 if mode == "fused" else 0.8, "confidence_radius_km": 25.0}
                   for i, (la, lo) in enumerate(truth)]
        write_predictions(tmp_path / f"{mode}.parquet",
                          answers_to_frame(answers, [str(i) for i in range(4)], truth, suite="im2gps3k"))
    r = _invoke("report", str(tmp_path / "fused.parquet"), str(tmp_path / "knn.parquet"), "--out",
                str(tmp_path / "rep"), "--json", "--no-ci")
    assert r.exit_code == 0, r.output
    a = json.loads(r.stdout)
    assert a["by_mode"]["fused"]["acc"]["25"] == 1.0 and a["by_mode"]["knn"]["acc"]["25"] == 0.0
    text = _invoke("report", str(tmp_path / "fused.parquet"), str(tmp_path / "knn.parquet"), "--out",
                   str(tmp_path / "rep2"), "--no-ci").stdout
    assert "2 modes in these predictions" in text and "mode fused" in text and "mode knn" in text
    assert text.startswith("mode fused (2 modes in these predictions: fused, knn; compared below)")
    assert a["mode"] == "fused" and a["summary"]["n"] == 4 and a["summary"]["acc"]["25"] == 1.0  # fused's, not pooled
    assert len({r["query_id"] for r in a["worst"]}) == len(a["worst"]) and {r["mode"] for r in a["best"]} == {"fused"}
    assert "(fused)" in text.split("worst")[1] and "mode fused" in (tmp_path / "rep2" / "report.html").read_text()
    assert "these predictions " not in text.split("published results")[1]  # no pooled row beside GeoCLIP & co
    assert "By mode" in (tmp_path / "rep2" / "report.html").read_text()
    fused, knn = a["calibration"]["fused"]["25"], a["calibration"]["knn"]["25"]  # stated 90 %, right 100 %; 80 %, 0 %
    assert (fused["stated"], fused["observed"], fused["ece"]) == pytest.approx((0.9, 1.0, 0.1))
    assert (knn["stated"], knn["observed"], knn["ece"]) == pytest.approx((0.8, 0.0, 0.8))
    assert "Calibration of the stated confidence" in (tmp_path / "rep2" / "report.html").read_text()
    assert (tmp_path / "rep2" / "reliability.png").stat().st_size > 5000


def test_report_counts_unusable_predictions_as_failures_and_refuses_duplicates(tmp_path):
    import numpy as np

    from geo.store.predictions import answers_to_frame, write_predictions

    truth = [(48.85, 2.35)] * 5
    preds = [(48.85, 2.35), (np.nan, 2.0), (np.inf, 2.0), (95.0, 2.0), (48.85, 2.36)]
    answers = [{"image": f"{i}.jpg", "lat": la, "lon": lo, "mode": "knn", "error": None} for i, (la, lo) in
               enumerate(preds)]
    write_predictions(tmp_path / "p.parquet", answers_to_frame(answers, [str(i) for i in range(5)], truth))
    r = _invoke("report", str(tmp_path / "p.parquet"), "--out", str(tmp_path / "rep"), "--json", "--no-ci")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)["summary"]
    assert s["n"] == 2 and s["n_failed"] == 3 and s["acc_over_total"]["1"] == pytest.approx(2 / 5)  # not 2 / 2

    write_predictions(tmp_path / "dup.parquet", answers_to_frame(answers[:2] + answers[:1], ["a", "b", "a"],
                                                                 truth[:3]))
    r = _invoke("report", str(tmp_path / "dup.parquet"), "--out", str(tmp_path / "rep2"), "--no-ci")
    assert r.exit_code == 2 and "duplicate query ids" in r.output
