"""Fusion: the decision rule, tuning + calibration, and every mode through a real bundle."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import geo
from geo.cli import app
from geo.geodesy import haversine_km
from geo.retrieval.fusion import Evidence, FusionParams, decide, tune

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "osv5m"


def evidence(knn_sim, knn_pts, cell_prob, cell_pts, prior_prob=None, prior_pts=None) -> Evidence:
    n = 1
    prior_prob = cell_prob if prior_prob is None else prior_prob
    prior_pts = cell_pts if prior_pts is None else prior_pts
    return Evidence(np.array([knn_pts], float), np.array([knn_sim], float), np.zeros((n, 0, 2)), np.zeros((n, 0)),
                    np.array([cell_pts], float), np.array([cell_prob], float),
                    np.array([prior_pts], float), np.array([prior_prob], float))


PARIS, BERLIN, TOKYO, LIMA = (48.85, 2.35), (52.52, 13.40), (35.68, 139.69), (-12.05, -77.04)


def test_near_duplicate_wins_over_a_confident_prior():
    ev = evidence([0.99, 0.40, 0.39, 0.38], [LIMA, PARIS, BERLIN, TOKYO], [0.7, 0.2, 0.1], [PARIS, BERLIN, TOKYO])
    d = decide(ev, FusionParams(w_cells=0.2, w_knn=0.6, w_gallery=0.0, w_prior=0.2, knn_temperature=0.02))[0]
    assert haversine_km(d.lat, d.lon, *LIMA) < 1
    assert d.mass["1"] > 0.55


def test_near_duplicate_is_answered_at_its_spot_whatever_the_tuned_weights():
    # B is 600 km north of Lima and C 600 km north of B: B's 750 km region holds all three neighbours,
    # Lima's only two, so a region-only decision would move the answer off the duplicate to B
    b, c = (-6.65, -77.04), (-1.25, -77.04)
    ev = evidence([0.999, 0.60, 0.59], [LIMA, b, c], [1.0], [PARIS])
    for decision in ("region", "coarse", "all"):
        p = FusionParams(w_cells=0.0, w_knn=0.0, w_gallery=0.0, w_prior=1.0, decision=decision, duplicate_similarity=0.95)
        d = decide(ev, p)[0]
        assert haversine_km(d.lat, d.lon, *LIMA) < 0.01, decision


def test_weak_evidence_backs_off_to_the_dense_region():
    # neighbours all equally (dis)similar and scattered: their mass is flat, the prior's is not
    ev = evidence([0.30, 0.30, 0.30], [LIMA, TOKYO, (0.0, 20.0)], [0.6, 0.3, 0.1], [PARIS, BERLIN, TOKYO])
    d = decide(ev, FusionParams(w_cells=0.3, w_knn=0.4, w_gallery=0.0, w_prior=0.3))[0]
    assert haversine_km(d.lat, d.lon, *PARIS) < 1
    assert d.mass["2500"] == pytest.approx(0.6 * (0.9 * 0.3 + 0.9 * 0.3) / 0.6)  # Paris + Berlin, from cells and prior
    assert d.alternatives  # the rest are offered as alternatives


def test_tuning_picks_the_informative_signal_and_calibrates():
    rng = np.random.default_rng(0)
    n = 60
    truth = np.column_stack([rng.uniform(-50, 60, n), rng.uniform(-150, 150, n)])
    # kNN's top neighbour is the truth for 2/3 of queries; the cells always point at one wrong place
    knn_pts = np.stack([np.where((np.arange(n) % 3 != 0)[:, None], truth, [[0.0, 0.0]]), rng.uniform(-60, 60, (n, 2))], 1)
    ev = Evidence(knn_pts, np.tile([0.9, 0.5], (n, 1)), np.zeros((n, 0, 2)), np.zeros((n, 0)),
                  np.tile([[[70.0, -40.0]]], (n, 1, 1)), np.ones((n, 1)), np.tile([[[70.0, -40.0]]], (n, 1, 1)), np.ones((n, 1)))
    params, report = tune(ev, truth, has_cells=True, has_gallery=False, log=lambda *_: None)
    assert params.w_knn >= 0.5 and params.w_cells == 0.0  # the signal that points at a wrong place gets no weight
    assert report["validation"]["25"] == pytest.approx(2 / 3, abs=0.02)
    assert set(params.calibration) == {"25", "200", "750"}
    assert report["ece"]["25"]["calibrated"] <= report["ece"]["25"]["raw"] + 1e-9


@pytest.fixture(scope="module")
def fused_index(tmp_path_factory) -> Path:
    from geo.index_build.embed import EmbedConfig
    from geo.index_build.runner import BuildConfig, build_index

    df = pd.read_csv(EXAMPLES / "gallery.csv", dtype={"id": str})
    df["path"] = [str(EXAMPLES / p) for p in df["path"]]
    df["owner"] = [f"o{i % 9}" for i in range(len(df))]  # nine "photographers" so the split holds out whole groups
    man = tmp_path_factory.mktemp("m") / "gallery.csv"
    df.to_csv(man, index=False)
    out = tmp_path_factory.mktemp("f") / "bundle"
    build_index(BuildConfig(manifest=str(man), out=str(out), embed=EmbedConfig(workers=0, batch_size=16),
                            stage_options={"gallery": {"epochs": 2}, "cells": {"max_epochs": 3}}),
                log=lambda *_: None, progress=False)
    return out


def test_every_mode_answers_and_duplicate_wins_in_fused_mode(fused_index):
    index = geo.open_index(fused_index)
    assert index.modes == ["fused", "knn", "gallery", "cells"] and index.default_mode == "fused"
    photo = sorted((EXAMPLES / "gallery").glob("*.jpg"))[10]
    truth = pd.read_csv(EXAMPLES / "gallery.csv", dtype={"id": str}).set_index("id").loc[photo.stem]
    for mode in index.modes:
        a = index.locate(str(photo), mode=mode)
        assert a["mode"] == mode and -90 <= a["lat"] <= 90 and -180 <= a["lon"] <= 180
        assert a["top_cells"] and a["neighbors"]
        assert bool(a.get("gallery")) == (mode in ("gallery", "fused"))  # gallery evidence where it was used
    fused = index.locate(str(photo))
    assert haversine_km(fused["lat"], fused["lon"], truth["latitude"], truth["longitude"]) < 0.01
    assert set(fused["p_within"]) == {"25", "200", "750"}


def test_fusion_weights_round_trip_through_the_bundle(fused_index):
    stored = json.loads((fused_index / "fusion" / "fusion.json").read_text())
    loaded = geo.open_index(fused_index).fusion
    assert loaded == FusionParams.from_dict(stored["params"])
    w = loaded.w_cells + loaded.w_knn + loaded.w_gallery + loaded.w_prior
    assert w == pytest.approx(1.0)


def test_min_confidence_abstains(fused_index):
    photo = str(sorted((EXAMPLES / "queries").glob("*.jpg"))[0])
    r = CliRunner().invoke(app, ["query", photo, "--index", str(fused_index), "--json", "--min-confidence", "1.01"])
    assert r.exit_code == 0, r.output
    a = json.loads(r.output)
    assert a["abstained"] is True and a["lat"] is None
    r = CliRunner().invoke(app, ["query", photo, "--index", str(fused_index), "--json", "--min-confidence", "0"])
    assert json.loads(r.output)["abstained"] is False


def test_closeness_agrees_with_haversine_at_every_threshold():
    from geo.retrieval.fusion import THRESHOLDS_KM, _cos_km, closeness

    rng = np.random.default_rng(0)
    p = np.stack([rng.uniform(-80, 80, 200), rng.uniform(-180, 180, 200)], 1)
    p[1], p[2] = p[0] + [0.005, 0.0], p[0] + [0.02, 0.0]  # 0.6 km and 2.2 km from p[0]: either side of 1 km
    ev = evidence(np.zeros(200), p, np.zeros(0), np.zeros((0, 2)))
    c = closeness(ev)[0]
    d = haversine_km(p[:, None, 0], p[:, None, 1], p[None, :, 0], p[None, :, 1])
    for t in THRESHOLDS_KM:
        assert np.array_equal(c[:200, :200] >= _cos_km(t), d <= t), t
