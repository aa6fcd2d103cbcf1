"""Running suites against an index (a fake one here: the runner only needs `locate`)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

import geo.cli.bench
from geo.eval.runner import run_suite
from geo.eval.suites import SuiteError, get_suite, shared_data_dir
from geo.store.predictions import read_predictions

DATA = shared_data_dir()


class FakeIndex:
    """Answers each photo with its true location shifted by a known amount (more in the cells mode); fails on
    chosen files. ``calls`` records each embedding pass (the photos and the modes asked for)."""

    default_mode = "fused"
    modes = ["fused", "knn", "cells"]

    def __init__(self, truth: dict[str, tuple[float, float]], shift_deg: float = 0.1, fail: set[str] = frozenset()):
        self.truth, self.shift, self.fail, self.calls = truth, shift_deg, set(fail), []

    def locate_modes(self, images, modes, crops=1):
        self.calls.append((list(images), list(modes)))
        return [[self._answer(p, mode) for p in images] for mode in modes]

    def _answer(self, p, mode):
        name = Path(p).name
        if name in self.fail:
            return {"image": p, "lat": None, "lon": None, "confidence": None, "error": "cannot identify image"}
        lat, lon = self.truth[name]
        shift = self.shift * (10 if mode == "cells" else 1)
        return {"image": p, "lat": lat + shift, "lon": lon, "confidence": 0.5, "mode": mode,
                "neighbors": [{"id": "g1", "lat": lat, "lon": lon, "similarity": 0.9}],
                "top_cells": [], "alternatives": [], "error": None}


def _manifest(tmp_path: Path, n: int = 6, present: int = 5) -> tuple[Path, Path, dict]:
    images = tmp_path / "images"
    images.mkdir()
    rows, truth = [], {}
    for i in range(n):
        name = f"img{i}.jpg"
        lat, lon = 10.0 + i, 20.0 + i
        rows.append(f"{name},author,{lat},{lon},{i % 3},0,0,0,0,0")
        truth[name] = (lat, lon)
        if i < present:
            (images / name).write_bytes(b"jpeg")
    meta = tmp_path / "meta.csv"
    meta.write_text("IMG_ID,AUTHOR,LAT,LON,S3_Label,S16_Label,S365_Label,Prob_indoor,Prob_natural,Prob_urban\n"
                    + "\n".join(rows) + "\n")
    return images, meta, truth


def test_missing_and_failed_photos_are_counted(tmp_path):
    images, meta, truth = _manifest(tmp_path)
    res = run_suite(FakeIndex(truth, fail={"img1.jpg"}), get_suite("custom"), images, meta=meta, progress=False)
    s = res.summary(ci=False)
    assert res.missing == ["img5.jpg"]
    assert (s["n"], s["n_missing"], s["n_failed"], s["n_total"]) == (4, 1, 1, 6)
    assert s["acc"]["25"] == 1.0 and s["acc"]["1"] == 0.0  # 0.1 degree of latitude is 11.1 km
    assert s["acc_over_total"]["25"] == pytest.approx(4 / 6)
    assert set(s["by_scene"]) <= {"indoor", "natural", "urban"}


def test_resume_skips_ids_already_written(tmp_path):
    images, meta, truth = _manifest(tmp_path, present=6)
    out = tmp_path / "p.parquet"
    run_suite(FakeIndex(truth), get_suite("custom"), images, meta=meta, limit=3, out=out, progress=False)
    idx = FakeIndex(truth)
    res = run_suite(idx, get_suite("custom"), images, meta=meta, out=out, batch_size=2, shard_rows=1, progress=False)
    assert res.resumed == 3 and sum(len(photos) for photos, _ in idx.calls) == 3
    assert sorted(read_predictions(out)["query_id"]) == [f"img{i}.jpg" for i in range(6)]


def test_every_mode_from_one_embedding_pass_and_resume_adds_only_the_new_mode(tmp_path):
    """`geo bench --mode all`: each photo is embedded once for all modes, the rows are keyed by (photo, mode),
    and a later run asking for one more mode computes only that mode."""
    images, meta, truth = _manifest(tmp_path, present=6)
    out = tmp_path / "p.parquet"
    idx = FakeIndex(truth)
    res = run_suite(idx, get_suite("custom"), images, meta=meta, modes=["knn", None], out=out, batch_size=4,
                    progress=False)
    assert [m for _, m in idx.calls] == [["knn", "fused"]] * 2 and sum(len(p) for p, _ in idx.calls) == 6
    assert res.modes == ["knn", "fused"] and len(res.predictions) == 12
    idx = FakeIndex(truth)
    res = run_suite(idx, get_suite("custom"), images, meta=meta, modes=["knn", "fused", "cells"], out=out,
                    progress=False)
    assert idx.calls == [([str(images / f"img{i}.jpg") for i in range(6)], ["cells"])]
    assert res.resumed == 12 and len(read_predictions(out)) == 18
    cells, knn = res.summary(ci=False, mode="cells"), res.summary(ci=False, mode="knn")
    assert cells["n"] == knn["n"] == 6 and cells["acc"]["25"] == 0.0 and knn["acc"]["25"] == 1.0


def test_cli_mode_all_scores_each_mode_side_by_side(tmp_path, monkeypatch):
    images, meta, truth = _manifest(tmp_path)
    monkeypatch.setattr(geo.cli.bench, "open_index", lambda path, **kw: FakeIndex(truth))
    args = ["bench", "custom", "--index", str(tmp_path), "--images", str(images), "--meta", str(meta), "--mode", "all",
            "--no-ci"]
    s = json.loads(CliRunner().invoke(_app(), args + ["--json"]).stdout)
    assert s["mode"] == "all" and list(s["modes"]) == ["fused", "knn", "cells"]
    assert s["modes"]["knn"]["acc"]["25"] == 1.0 and s["modes"]["cells"]["acc"]["25"] == 0.0
    r = CliRunner().invoke(_app(), args)
    assert r.exit_code == 0, r.output
    assert "[fused]" in r.stdout and "[cells]" in r.stdout and "mode fused, knn, cells" in r.stdout


def test_empty_folder_and_wrong_folder_say_so(tmp_path):
    _, meta, truth = _manifest(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SuiteError, match="holds no images"):
        run_suite(FakeIndex(truth), get_suite("custom"), empty, meta=meta, progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "unrelated.jpg").write_bytes(b"x")
    with pytest.raises(SuiteError, match="none of the 6 images"):
        run_suite(FakeIndex(truth), get_suite("custom"), other, meta=meta, progress=False)


def _app() -> typer.Typer:
    """The real command group, its exception boundary included."""
    return geo.cli.app


def test_cli_custom_suite_json(tmp_path, monkeypatch):
    images, meta, truth = _manifest(tmp_path)
    monkeypatch.setattr(geo.cli.bench, "open_index", lambda path, **kw: FakeIndex(truth))
    out = tmp_path / "p.parquet"
    r = CliRunner().invoke(_app(), ["bench", "custom", "--index", str(tmp_path), "--images", str(images), "--meta",
                                    str(meta), "--mode", "knn", "--out", str(out), "--json", "--no-ci"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["n"] == 5 and s["n_missing"] == 1 and set(s["acc"]) == {"1", "25", "200", "750", "2500"}
    assert s["median_km"] == pytest.approx(11.12, abs=0.01) and s["mean_km"] == pytest.approx(11.12, abs=0.01)
    p = read_predictions(out)
    assert set(p["mode"]) == {"knn"} and set(p["suite"]) == {"custom"} and p["index_id"].notna().all()


def test_cli_bench_out_geojson(tmp_path, monkeypatch):
    images, meta, truth = _manifest(tmp_path)
    monkeypatch.setattr(geo.cli.bench, "open_index", lambda path, **kw: FakeIndex(truth, fail={"img1.jpg"}))
    out = tmp_path / "p.geojson"
    r = CliRunner().invoke(_app(), ["bench", "custom", "--index", str(tmp_path), "--images", str(images), "--meta",
                                    str(meta), "--out", str(out), "--json", "--no-ci"])
    assert r.exit_code == 0, r.output
    features = json.loads(out.read_text())["features"]
    answers = {f["properties"]["query_id"]: f for f in features if f["properties"]["role"] == "answer"}
    assert sorted(answers) == [f"img{i}.jpg" for i in range(5)]  # img5 has no file: missing, not answered
    assert answers["img1.jpg"]["geometry"] is None and answers["img1.jpg"]["properties"]["error"]
    lon, lat = answers["img2.jpg"]["geometry"]["coordinates"]
    assert (lat, lon) == pytest.approx((12.1, 22.0))
    assert answers["img2.jpg"]["properties"]["error_km"] == pytest.approx(11.12, abs=0.01)
    assert sum(f["properties"]["role"] == "truth" for f in features) == 5
    assert not list(tmp_path.glob("p.geojson.parts"))  # GeoJSON is written once, at the end


@pytest.mark.skipif(not (DATA / "im2gps3k-dev").is_dir(), reason="shared im2gps3k dev sample not available")
def test_cli_im2gps3k_dev_sample_end_to_end(tmp_path, monkeypatch):
    meta = pd.read_csv(DATA / "im2gps3k-dev" / "im2gps3k_places365.csv")
    truth = dict(zip(meta["IMG_ID"], zip(meta["LAT"], meta["LON"])))
    monkeypatch.setattr(geo.cli.bench, "open_index", lambda path, **kw: FakeIndex(truth, shift_deg=3.0))
    r = CliRunner().invoke(_app(), ["bench", "im2gps3k", "--index", str(tmp_path), "--images",
                                    str(DATA / "im2gps3k-dev" / "images"), "--limit", "40", "--no-ci",
                                    "--quiet", "--out", str(tmp_path / "p.parquet")])
    assert r.exit_code == 0, r.output
    assert "im2gps3k_places365.csv" in r.stdout and "scored 40 of 40" in r.stdout
    assert "GeoCLIP" in r.stdout and "NeurIPS 2023" in r.stdout  # published results beside ours


@pytest.mark.skipif(not (DATA / "osv5m-sample").is_dir(), reason="shared OSV-5M sample not available")
def test_osv5m_sample_reads_the_real_format(tmp_path):
    meta = pd.read_csv(DATA / "osv5m-sample" / "osv5m_sample.csv", dtype={"id": str})
    truth = {f"{i}.jpg": (la, lo) for i, la, lo in zip(meta["id"], meta["latitude"], meta["longitude"])}
    res = run_suite(FakeIndex(truth), get_suite("osv5m"), DATA / "osv5m-sample" / "images", progress=False)
    s = res.summary(ci=False)
    assert s["n"] == 71 and s["n_missing"] == 0
    assert res.predictions["country"].notna().all()
