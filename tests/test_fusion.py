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
from geo.core.geodesy import THRESHOLDS_KM, cos_km, haversine_km, thresholds_met
from geo.stages.fusion.posterior import FusionParams, SignalParams, closeness, decide
from geo.stages.fusion.signals import (
    CELLS,
    KNN,
    PRIOR,
    Evidence,
    SignalEvidence,
    SignalSpec,
)
from geo.stages.fusion.tuning import grid, tune

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "osv5m"


def _signal(score, pts) -> SignalEvidence:
    score = np.asarray(score, float)
    return SignalEvidence(np.asarray(pts, float).reshape(*score.shape, 2), score)


def evidence(knn_sim, knn_pts, cell_prob, cell_pts, prior_prob=None, prior_pts=None) -> Evidence:
    """One query's evidence from kNN, cells and the prior (the prior defaults to the cells' points)."""
    prior_prob = cell_prob if prior_prob is None else prior_prob
    prior_pts = cell_pts if prior_pts is None else prior_pts
    return Evidence([KNN, CELLS, PRIOR], {"knn": _signal([knn_sim], [knn_pts]), "cells": _signal([cell_prob], [cell_pts]),
                                          "prior": _signal([prior_prob], [prior_pts])})


def params(knn=0.0, cells=0.0, prior=0.0, knn_temperature=0.05, **kw) -> FusionParams:
    return FusionParams({"knn": SignalParams(knn, knn_temperature), "cells": SignalParams(cells, top_k=32),
                         "prior": SignalParams(prior)}, **kw)


PARIS, BERLIN, TOKYO, LIMA = (48.85, 2.35), (52.52, 13.40), (35.68, 139.69), (-12.05, -77.04)


def test_near_duplicate_wins_over_a_confident_prior():
    ev = evidence([0.99, 0.40, 0.39, 0.38], [LIMA, PARIS, BERLIN, TOKYO], [0.7, 0.2, 0.1], [PARIS, BERLIN, TOKYO])
    d = decide(ev, params(knn=0.6, cells=0.2, prior=0.2, knn_temperature=0.02))[0]
    assert haversine_km(d.lat, d.lon, *LIMA) < 1
    assert d.mass["1"] > 0.55


def test_near_duplicate_is_answered_at_its_spot_whatever_the_tuned_weights():
    # B is 600 km north of Lima and C 600 km north of B: B's 750 km region holds all three neighbours,
    # Lima's only two, so a region-only decision would move the answer off the duplicate to B
    b, c = (-6.65, -77.04), (-1.25, -77.04)
    ev = evidence([0.999, 0.60, 0.59], [LIMA, b, c], [1.0], [PARIS])
    for decision in ("region", "coarse", "all"):
        p = params(prior=1.0, decision=decision, duplicate_similarity=0.95)
        d = decide(ev, p)[0]
        assert haversine_km(d.lat, d.lon, *LIMA) < 0.01, decision


def test_weak_evidence_backs_off_to_the_dense_region():
    # neighbours all equally (dis)similar and scattered: their mass is flat, the prior's is not
    ev = evidence([0.30, 0.30, 0.30], [LIMA, TOKYO, (0.0, 20.0)], [0.6, 0.3, 0.1], [PARIS, BERLIN, TOKYO])
    d = decide(ev, params(knn=0.4, cells=0.3, prior=0.3))[0]
    assert haversine_km(d.lat, d.lon, *PARIS) < 1
    assert d.mass["2500"] == pytest.approx(0.6 * (0.9 * 0.3 + 0.9 * 0.3) / 0.6)  # Paris + Berlin, from cells and prior
    assert d.alternatives  # the rest are offered as alternatives


def test_tuning_picks_the_informative_signal_and_calibrates():
    rng = np.random.default_rng(0)
    n = 60
    truth = np.column_stack([rng.uniform(-50, 60, n), rng.uniform(-150, 150, n)])
    # kNN's top neighbour is the truth for 2/3 of queries; the cells always point at one wrong place
    knn_pts = np.stack([np.where((np.arange(n) % 3 != 0)[:, None], truth, [[0.0, 0.0]]), rng.uniform(-60, 60, (n, 2))], 1)
    wrong = np.tile([[[70.0, -40.0]]], (n, 1, 1))
    ev = Evidence([KNN, CELLS, PRIOR], {"knn": SignalEvidence(knn_pts, np.tile([0.9, 0.5], (n, 1))),
                                        "cells": SignalEvidence(wrong, np.ones((n, 1))),
                                        "prior": SignalEvidence(wrong.copy(), np.ones((n, 1)))})
    fitted, report = tune(ev, truth, log=lambda *_: None)
    assert fitted.weight("knn") >= 0.5 and fitted.weight("cells") == 0.0  # the signal pointing at a wrong place gets none
    assert report["validation"]["25"] == pytest.approx(2 / 3, abs=0.02)
    assert set(fitted.calibration) == {"25", "200", "750"}
    assert report["ece"]["25"]["calibrated"] <= report["ece"]["25"]["raw"] + 1e-9


def test_a_new_signal_is_mixed_and_tuned_without_other_changes():
    """A head fusion has never heard of (here a 'country' head) takes part by its spec alone."""
    country = SignalSpec("country", "probs", top_ks=(0,), default_weight=0.5)
    ev = Evidence([KNN, country, PRIOR], {"knn": _signal([[0.30, 0.30]], [[LIMA, TOKYO]]),
                                          "country": _signal([[0.9, 0.1]], [[BERLIN, TOKYO]]),
                                          "prior": _signal([[1.0]], [[PARIS]])})
    d = decide(ev, FusionParams.default(ev.specs))[0]
    assert haversine_km(d.lat, d.lon, *BERLIN) < 1  # the new signal's weight moved the answer to its country
    settings = grid(ev.specs)
    assert all(set(p.signals) == {"knn", "country", "prior"} for p in settings)
    assert any(p.weight("country") == 1.0 for p in settings)
    assert len(settings) == 45 * 3 * 3  # 45 weight splits over 3 signals x 3 kNN temperatures x 3 decisions


def test_params_from_bundles_before_named_signals_read_as_the_same_setting():
    old = {"w_cells": 0.25, "w_knn": 0.5, "w_gallery": 0.125, "w_prior": 0.125, "knn_temperature": 0.02,
           "gallery_temperature": 2.0, "top_cells": 8, "gallery_k": 32, "duplicate_similarity": 0.9, "decision": "coarse",
           "calibration": {}}
    p = FusionParams.from_dict(old)
    assert p.signals["cells"] == SignalParams(0.25, 1.0, 8) and p.signals["knn"] == SignalParams(0.5, 0.02, 0)
    assert p.signals["gallery"] == SignalParams(0.125, 2.0, 32) and p.decision == "coarse"
    assert FusionParams.from_dict(p.to_dict()) == p


@pytest.fixture(scope="module")
def fused_index(cli_bundle) -> Path:
    return cli_bundle[1]


def test_every_mode_answers_and_duplicate_wins_in_fused_mode(fused_index):
    index = geo.open_index(fused_index)
    assert index.modes == ["fused", "knn", "gallery", "cells", "regression"] and index.default_mode == "fused"
    photo = sorted((EXAMPLES / "gallery").glob("*.jpg"))[10]
    truth = pd.read_csv(EXAMPLES / "gallery.csv", dtype={"id": str}).set_index("id").loc[photo.stem]
    for mode in index.modes:
        a = index.locate_one(str(photo), mode=mode)
        assert a.mode == mode and -90 <= a.lat <= 90 and -180 <= a.lon <= 180
        assert a.top_cells and a.neighbors
        assert bool(a.gallery) == (mode in ("gallery", "fused"))  # gallery evidence where it was used
        assert set(a.to_dict()) == set(index.locate_one(str(photo), mode="knn").to_dict())  # the same fields in every mode
    fused = index.locate_one(str(photo))
    assert haversine_km(fused.lat, fused.lon, truth["latitude"], truth["longitude"]) < 0.01
    assert set(fused.p_within) == {"25", "200", "750"}


def test_fusion_weights_round_trip_through_the_bundle(fused_index):
    stored = json.loads((fused_index / "fusion" / "fusion.json").read_text())
    loaded = geo.open_index(fused_index).fusion.params
    assert loaded == FusionParams.from_dict(stored["params"])
    assert set(loaded.signals) == {"knn", "gallery", "cells", "prior"}
    assert sum(p.weight for p in loaded.signals.values()) == pytest.approx(1.0)


def test_min_confidence_abstains(fused_index):
    """Abstention is the query layer's: the API and the CLI withhold the same answers."""
    photo = str(sorted((EXAMPLES / "queries").glob("*.jpg"))[0])
    index = geo.open_index(fused_index)
    kept = index.locate_one(photo)
    assert not kept.abstained and kept.lat is not None
    withheld = index.locate_one(photo, min_confidence=kept.confidence + 1e-3)
    assert withheld.abstained and withheld.lat is None and withheld.lon is None
    assert withheld.confidence == kept.confidence and withheld.neighbors == kept.neighbors
    assert not index.locate_one(photo, min_confidence=kept.confidence).abstained  # at the threshold: answered
    r = CliRunner().invoke(app, ["query", photo, "--index", str(fused_index), "--json",
                                 "--min-confidence", str(kept.confidence + 1e-3)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == withheld.to_dict()
    r = CliRunner().invoke(app, ["query", photo, "--index", str(fused_index), "--json", "--min-confidence", "0"])
    assert json.loads(r.output)["abstained"] is False


def test_closeness_agrees_with_haversine_at_every_threshold():
    rng = np.random.default_rng(0)
    p = np.stack([rng.uniform(-80, 80, 200), rng.uniform(-180, 180, 200)], 1)
    p[1], p[2] = p[0] + [0.005, 0.0], p[0] + [0.02, 0.0]  # 0.6 km and 2.2 km from p[0]: either side of 1 km
    ev = evidence(np.zeros(200), p, np.zeros(0), np.zeros((0, 2)))
    c = closeness(ev)[0]
    d = haversine_km(p[:, None, 0], p[:, None, 1], p[None, :, 0], p[None, :, 1])
    for t in THRESHOLDS_KM:
        assert np.array_equal(c[:200, :200] >= cos_km(t), d <= t), t


def test_coverage_in_blocks_is_each_thresholds_mass_within_reach(monkeypatch):
    """Every threshold in one product, a block of queries at a time (the block as small as one query or all of
    them at once): a candidate's coverage is the mass of the points within each threshold of it."""
    from geo.stages.fusion import posterior

    rng = np.random.default_rng(1)
    pts = rng.normal(size=(7, 60, 3))
    pts[:, :30] = pts[:, :1] + rng.normal(0, 0.01, (7, 30, 3))  # a cluster: every threshold counts something
    pts /= np.linalg.norm(pts, axis=-1, keepdims=True)
    c, mass, block = pts @ pts.transpose(0, 2, 1), rng.random((7, 25)), slice(20, 45)
    want = np.stack([((c[:, :, block] >= cos_km(t)) * mass[:, None, :]).sum(-1) for t in THRESHOLDS_KM], 1)
    for elements in (1, 5 * 60 * 25 * 3, 1 << 23):  # a query a block, three, all seven
        monkeypatch.setattr(posterior, "COVERAGE_BLOCK", elements)
        got = posterior.coverage(c, block, mass)
        assert got.shape == (7, len(THRESHOLDS_KM), 60) and np.allclose(got, want, rtol=1e-6, atol=1e-7)
    empty = posterior.coverage(c[:0], block, mass[:0])  # a batch with no query left (every row refused)
    assert empty.shape == (0, len(THRESHOLDS_KM), 60) and empty.dtype == np.float32


def test_the_share_of_thresholds_met_is_the_mean_of_the_five_accuracies():
    km = np.array([0.5, 1.0, 24.0, 199.0, 751.0, 2600.0, np.nan])
    assert thresholds_met(km).tolist() == [1.0, 1.0, 0.8, 0.6, 0.2, 0.0, 0.0]  # NaN (no answer) meets none
    errors = np.random.default_rng(0).uniform(0, 3000, 500)
    assert thresholds_met(errors).mean() == pytest.approx(np.mean([np.mean(errors <= t) for t in THRESHOLDS_KM]))


def test_the_grid_is_scored_as_decide_batch_answers_each_setting():
    """The grouped, vectorised scoring of the tuning grid picks, for every setting and photo, a candidate that
    decide_batch scores best too (ties within float precision may go either way), absent signals,
    near-duplicates and top-K included; and the per-photo scores are decide_batch's wherever it has no such tie."""
    from geo.stages.fusion.posterior import decide_batch
    from geo.stages.fusion.signals import GALLERY
    from geo.stages.fusion.tuning import score_grid

    rng = np.random.default_rng(3)
    n = 40
    truth = np.column_stack([rng.uniform(-60, 60, n), rng.uniform(-170, 170, n)])
    near = lambda k: truth[:, None, :] + rng.normal(0, 2.0, (n, k, 2))  # noqa: E731  points around the truth
    knn = SignalEvidence(near(6), np.sort(rng.uniform(0.2, 0.8, (n, 6)), axis=1)[:, ::-1].copy())
    knn.score[0, 0] = 0.999  # a near-duplicate
    gal = SignalEvidence(rng.uniform(-60, 60, (n, 40, 2)), np.sort(rng.normal(0, 3, (n, 40)), axis=1)[:, ::-1].copy())
    cells_p = np.sort(rng.dirichlet(np.ones(33), n), axis=1)[:, ::-1].copy()
    cells_p[5] = 0.0  # no cell evidence for this photo: its weight goes to the other signals
    cells = SignalEvidence(np.where(cells_p[..., None] > 0, near(33), np.nan), cells_p)
    prior = SignalEvidence(np.broadcast_to(rng.uniform(-60, 60, (1, 5, 2)), (n, 5, 2)).copy(),
                           np.broadcast_to([0.4, 0.3, 0.3, 0.0, 0.0], (n, 5)).copy())
    ev = Evidence([KNN, GALLERY, CELLS, PRIOR], {"knn": knn, "gallery": gal, "cells": cells, "prior": prior})
    settings = grid(ev.specs)
    for p in settings:
        p.duplicate_similarity = 0.99
    picked = [settings[i] for i in rng.choice(len(settings), 150, replace=False)]
    fast = score_grid(ev, truth, picked)
    d = haversine_km(ev.points[..., 0], ev.points[..., 1], truth[:, None, 0], truth[:, None, 1])
    share = np.mean([d <= t for t in THRESHOLDS_KM], axis=0)  # [n, m]: what answering each candidate scores
    exact = 0
    for p, got in zip(picked, np.asarray(fast, np.float64)):
        _, score, _ = decide_batch(ev, p)
        top = score.max(axis=1, keepdims=True)
        ties = np.isclose(score, top, rtol=1e-5, atol=1e-7)  # the decision's best candidates
        # the fast pick must score like one of decide_batch's best candidates
        assert all(np.isclose(share[i][ties[i]], got[i]).any() for i in range(n)), str(p)
        unique = ties.sum(axis=1) == 1
        b = score.argmax(axis=1)
        np.testing.assert_array_equal(got[unique], share[np.arange(n), b][unique])
        exact += int(unique.sum())
    assert exact > 0.4 * n * len(picked)  # many decisions are not ties: the exact check is not vacuous


def test_fusion_folds_and_the_large_gallery_holdout_keep_photographers_apart():
    from geo.core.splits import validation_mask
    from geo.stages.fusion.stage import FusionConfig, holdout_rows, splits

    rng = np.random.default_rng(0)
    groups = np.array([f"a{i}" for i in rng.integers(0, 300, 3000)])
    cfg = FusionConfig(max_queries=400)
    parts = splits(900, groups[:900], cfg)
    assert len(parts) == 3
    for held, fit in parts:
        assert not set(groups[held]) & set(groups[fit])  # no query sees its own photographer
        assert len(held) <= cfg.max_queries and len(fit) > 0
    # a large gallery: queries are whole photographers from the trained stages' held-out ones
    val = validation_mask(3000, groups, 0.2, 0)
    rows = holdout_rows(val, groups, cfg.max_queries, 0)
    assert 200 <= len(rows) <= 800 and val[rows].all()
    assert not set(groups[rows]) & set(groups[np.setdiff1d(np.arange(3000), rows)])
