"""Fusion's reranker: candidates within the top cells scored by a learned function, with the mixture's back-off."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from geo.core.geodesy import THRESHOLDS_KM, haversine_km, thresholds_met
from geo.stages.fusion.posterior import (
    FusionParams,
    SignalParams,
    closeness,
    decide,
    learned_summary,
    near_duplicate,
    signal_coverages,
)
from geo.stages.fusion import rerank as R
from geo.stages.fusion.rerank import Reranker
from geo.stages.fusion.signals import CELLS, KNN, PRIOR, Evidence, SignalEvidence
from geo.stages.fusion.stage import FusionModel, _tuned
from geo.stages.fusion.trees import Trees
from geo.store.bundle import Bundle, BundleError


def _offset(pts: np.ndarray, km: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Points ``km`` away from ``pts`` in random directions (flat-earth, fine away from the poles)."""
    a = rng.uniform(0, 2 * np.pi, km.shape)
    dlat = km * np.cos(a) / 111.0
    dlon = km * np.sin(a) / (111.0 * np.cos(np.radians(pts[..., 0])))
    return np.stack([pts[..., 0] + dlat, pts[..., 1] + dlon], -1)


def world(n: int = 900, seed: int = 0, informative: bool = True) -> tuple[Evidence, np.ndarray, np.ndarray]:
    """(evidence, truth, photographers) where the cells know the region and kNN knows the spot.

    Half the photos ("indoor-ish", kNN similarity 0.4): the cells put 90 % of
    their mass on fine cells 60-150 km around the truth (the region, never the
    spot); kNN has three clusters of neighbours, one neighbour at the truth's spot
    and seven at each of two spots in other regions, so kNN alone is wrong. The other half (landmarks, similarity 0.8): the cells point at a
    wrong region, and the truth's neighbour cluster is the largest. The right
    answer is "the neighbour spot inside the trusted cell" for the first half
    and "the neighbour spot" for the second: what a fixed mixture cannot do
    both of, and the query's own top similarity tells which. With
    ``informative=False`` the neighbours and cells are noise.
    """
    rng = np.random.default_rng(seed)
    regions = np.stack([rng.uniform(-50, 60, 60), rng.uniform(-170, 170, 60)], 1)
    region = rng.integers(0, 60, n)
    truth = _offset(regions[region], rng.uniform(0, 200, n), rng)
    landmark = rng.random(n) < 0.5
    other = (region[:, None] + rng.integers(1, 60, (n, 2))) % 60  # two other regions per photo
    centres = np.stack([truth, *(_offset(regions[other[:, i]], rng.uniform(0, 200, n), rng) for i in range(2))], 1)
    which = np.where(landmark[:, None], np.repeat(np.arange(3), [6, 5, 4])[None], np.repeat(np.arange(3), [1, 7, 7])[None])
    knn_pts = _offset(centres[np.arange(n)[:, None], which], rng.uniform(0, 4, (n, 15)), rng)
    sims = np.where(landmark, 0.8, 0.4)[:, None] + rng.normal(0, 0.01, (n, 15))
    perm = np.argsort(-sims, axis=1)
    knn_pts, sims = np.take_along_axis(knn_pts, perm[..., None], 1), np.take_along_axis(sims, perm, 1)
    cell_home = np.where(landmark[:, None], regions[other[:, 0]], truth)
    cell_pts = _offset(np.repeat(cell_home[:, None], 8, 1), rng.uniform(60, 150, (n, 8)), rng)
    cell_p = np.tile(np.array([0.3, 0.2, 0.15, 0.1, 0.08, 0.07, 0.05, 0.05]), (n, 1))
    if not informative:
        knn_pts = np.stack([rng.uniform(-50, 60, (n, 15)), rng.uniform(-170, 170, (n, 15))], -1)
        cell_pts = np.stack([rng.uniform(-50, 60, (n, 8)), rng.uniform(-170, 170, (n, 8))], -1)
    prior = SignalEvidence(np.broadcast_to(regions[None, :10], (n, 10, 2)).copy(), np.full((n, 10), 0.1))
    ev = Evidence([KNN, CELLS, PRIOR], {"knn": SignalEvidence(knn_pts, sims), "cells": SignalEvidence(cell_pts, cell_p),
                                        "prior": prior})
    return ev, truth, np.array([f"a{i % 150}" for i in range(n)])


def _fitted(ev: Evidence, truth: np.ndarray, groups: np.ndarray) -> FusionModel:
    singles = {"knn": ev.signals["knn"].latlon[:, 0], "cells": ev.signals["cells"].latlon[:, 0]}
    return _tuned(ev, singles, truth, groups, {}, 0.0, lambda *_: None)


def _hits(answers: np.ndarray, truth: np.ndarray) -> dict[int, float]:
    d = haversine_km(answers[:, 0], answers[:, 1], truth[:, 0], truth[:, 1])
    return {t: float(np.mean(d <= t)) for t in THRESHOLDS_KM}


def _answers(decisions) -> np.ndarray:
    return np.array([[d.lat, d.lon] for d in decisions])


@pytest.fixture(scope="module")
def informative() -> FusionModel:
    return _fitted(*world(600, seed=0))


def test_reranked_answer_beats_the_cells_the_neighbours_and_the_mixture(informative):
    """New photos of the same world: the ranker answers at the neighbour spot inside the trusted cell, or at
    the landmark's spot, and beats the top neighbour, the top cell and the mixture at every threshold
    from 25 km (the neighbours scatter 0-4 km around their spot, so 1 km is luck for all of them)."""
    assert informative.reranker is not None and informative.params.rerank["used"]
    ev, truth, _ = world(400, seed=1)
    fused = _hits(_answers(informative.decide(ev)), truth)
    mixture = _hits(_answers(decide(ev, informative.params)), truth)
    knn, cells = _hits(ev.signals["knn"].latlon[:, 0], truth), _hits(ev.signals["cells"].latlon[:, 0], truth)
    for t in (25, 200, 750, 2500):
        assert fused[t] > max(knn[t], cells[t]) + 0.2, t
        assert fused[t] > mixture[t] + 0.05, t
    assert fused[25] > 0.8


def test_reranked_p_within_is_calibrated_on_new_photos(informative):
    ev, truth, _ = world(400, seed=2)
    decisions = informative.decide(ev)
    d = haversine_km(*_answers(decisions).T, truth[:, 0], truth[:, 1])
    for t in ("25", "200", "750"):
        p = np.array([x.p_within[t] for x in decisions])
        assert abs(p.mean() - np.mean(d <= float(t))) < 0.08, t


def test_without_signal_the_mixture_answers_exactly():
    ev, truth, groups = world(600, seed=0, informative=False)
    model = _fitted(ev, truth, groups)
    assert model.reranker is None and model.params.rerank["used"] is False
    new, _, _ = world(200, seed=3, informative=False)
    got, want = model.decide(new), decide(new, model.params)
    assert [(d.lat, d.lon, d.alternatives, d.p_within) for d in got] == [(d.lat, d.lon, d.alternatives, {}) for d in want]


def _bundle_with(model: FusionModel, root) -> Bundle:
    b = Bundle.create_or_resume(root, {"name": "toy"}, 4)
    files, info = model.save(b)
    b.commit("fusion", files, info, replace=("fusion/",))
    return b


def test_save_and_load_give_identical_answers(informative, tmp_path):
    b = _bundle_with(informative, tmp_path / "b")
    assert (tmp_path / "b" / "fusion" / "rerank.json").exists()
    assert "pickle" not in (tmp_path / "b" / "fusion" / "rerank.json").read_text()  # plain arrays in JSON
    loaded = FusionModel.load(b)
    assert loaded.reranker is not None and loaded.params == informative.params
    ev, _, _ = world(200, seed=4)
    assert loaded.decide(ev) == informative.decide(ev)


def test_a_bundle_without_the_reranker_answers_with_the_mixture(informative, tmp_path):
    """Bundles from before the reranker (no rerank.json, no ``rerank`` in the params) and a rerank.json left
    over from an earlier build that the manifest no longer lists both answer with the mixture."""
    old = FusionModel(FusionParams.from_dict({k: v for k, v in informative.params.to_dict().items() if k != "rerank"}))
    b = _bundle_with(informative, tmp_path / "b")
    b = _bundle_with(old, tmp_path / "b")  # refitted without: the file stays on disk, the manifest drops it
    assert (tmp_path / "b" / "fusion" / "rerank.json").exists() and "fusion/rerank.json" not in b.manifest["files"]
    loaded = FusionModel.load(b)
    assert loaded.reranker is None
    ev, _, _ = world(100, seed=5)
    assert loaded.decide(ev) == decide(ev, old.params)


def test_trees_predict_as_scikit_learn_does_and_survive_json():
    from sklearn.ensemble import HistGradientBoostingRegressor

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 6)).astype(np.float32)
    y = np.sin(x[:, 0]) + (x[:, 1] > 0.3) * x[:, 2] + rng.normal(0, 0.1, 2000)
    x[::7, 1] = np.nan  # missing values take the side the fit chose for them
    model = HistGradientBoostingRegressor(max_iter=30, max_leaf_nodes=15, early_stopping=False).fit(x, y)
    trees = Trees.from_sklearn(model)
    np.testing.assert_allclose(trees.predict(x), model.predict(x), rtol=0, atol=1e-9)
    np.testing.assert_allclose(trees.predict(x[:1]), model.predict(x[:1]), rtol=0, atol=1e-9)
    again = Trees.from_dict(json.loads(json.dumps(trees.to_dict())))
    np.testing.assert_array_equal(again.predict(x), trees.predict(x))
    assert Reranker.from_dict(json.loads(json.dumps(Reranker(trees, ["f"] * 6).to_dict()))).trees.depth == trees.depth


def test_fused_is_never_below_a_restriction_of_itself():
    """A fused setting that backed off to the prior, where the cells with the prior (one of its restrictions)
    do better on the same out-of-fold photos, answers as that restriction (the Im2GPS3k case of issue 24)."""
    from geo.stages.fusion.tuning import no_worse_than_restrictions, score_grid

    ev, truth, _ = world(300, seed=6)
    prior_only = FusionParams({"knn": SignalParams(0.0, 0.05), "cells": SignalParams(0.0, top_k=8),
                               "prior": SignalParams(1.0)}, decision="region")
    cells = FusionParams({"cells": SignalParams(0.5, top_k=8), "prior": SignalParams(0.5)}, decision="coarse")
    prior_only.mode_fusion = {"cells": cells.to_dict()}
    chosen, report = no_worse_than_restrictions(ev, prior_only, truth, log=lambda *_: None)
    assert report["restriction"] == "cells" and chosen.weight("cells") == 0.5 and chosen.decision == "coarse"
    assert report["restriction_scores"]["cells"] > report["restriction_scores"]["fused"]
    assert score_grid(ev, truth, [chosen]).mean() == pytest.approx(report["restriction_scores"]["cells"], abs=1e-4)
    assert set(chosen.calibration) == {"25", "200", "750"}
    same, report = no_worse_than_restrictions(ev, chosen, truth, log=lambda *_: None)  # already the best: kept
    assert report["restriction"] is None and same.signals == chosen.signals


def test_a_reranker_fitted_on_other_signals_leaves_the_answer_to_the_mixture(informative):
    ev, _, _ = world(100, seed=7)
    without_cells = Evidence([KNN, PRIOR], {n: ev.signals[n] for n in ("knn", "prior")})
    assert informative.decide(without_cells) == decide(without_cells, informative.params)


def test_the_answer_rule_is_chosen_out_of_fold_and_kept_in_the_file(informative):
    """The ranker's own pick (0 km) or the mixture's spot near it (200 or 750 km): the build records which scored
    better on other photographers, the file keeps it, and a file from before the choice reads as the 750-km rule."""
    r = informative.reranker
    assert r.region_km in R.REGION_KMS and informative.params.rerank["region_km"] == r.region_km
    assert Reranker.from_dict(r.to_dict()).region_km == r.region_km
    old = {k: v for k, v in r.to_dict().items() if k != "region_km"}
    assert Reranker.from_dict(old).region_km == 750.0
    ev, truth, _ = world(200, seed=5)
    own = FusionModel(informative.params, reranker=dataclasses.replace(r, region_km=0.0)).decide(ev)
    near = FusionModel(informative.params, reranker=dataclasses.replace(r, region_km=750.0)).decide(ev)
    p = informative.params
    c = closeness(ev)
    x, allowed, mixture, _ = R.design(ev, p, c, signal_coverages(ev, p, c))
    score = np.full(allowed.shape, -np.inf)
    score[allowed] = r.trees.predict(x[allowed])
    top = ev.points[np.arange(len(ev)), score.argmax(axis=1)]
    dup = near_duplicate(ev, p)
    assert np.allclose(_answers(own)[~dup], top[~dup])  # the ranker's own best candidate answers
    assert any((a.lat, a.lon) != (b.lat, b.lon) for a, b in zip(own, near))


def test_the_mixture_is_tuned_on_its_rows_and_the_reranker_on_every_scored_photo():
    """A large gallery scores more photos than the mixture's grid needs: the grid sees ``tune_rows`` only (the
    same weights as tuning on those photos alone), the ranker all of them, and the report says both counts."""
    ev, truth, groups = world(600, seed=0)
    sub = np.flatnonzero(np.isin(groups, [f"a{i}" for i in range(0, 150, 2)]))
    singles = {"knn": ev.signals["knn"].latlon[:, 0], "cells": ev.signals["cells"].latlon[:, 0]}
    quiet = lambda *_: None  # noqa: E731
    both = _tuned(ev, singles, truth, groups, {}, 0.0, quiet, sub)
    alone = _tuned(ev.take(sub), {m: v[sub] for m, v in singles.items()}, truth[sub], groups[sub], {}, 0.0, quiet)
    assert both.params.signals == alone.params.signals
    assert both.report["n_validation"] == len(sub) and both.report["n_reranker"] == len(ev)
    assert both.params.rerank["queries"] == len(ev)


def test_the_build_says_which_rule_answers_and_on_how_many_photos(informative):
    words = learned_summary(informative.params, 0.9)
    assert f"out of fold on {informative.params.rerank['queries']:,} photos" in words
    own = dataclasses.replace(informative.params, rerank={**informative.params.rerank, "region_km": 0.0})
    near = dataclasses.replace(informative.params, rerank={**informative.params.rerank, "region_km": 750.0})
    assert "its best candidate answers" in learned_summary(own, 0.9)
    assert "within 750 km of it answers" in learned_summary(near, 0.9)
    old = {k: v for k, v in informative.params.rerank.items() if k not in ("region_km", "queries")}
    assert "within 750 km of it answers" in learned_summary(dataclasses.replace(informative.params, rerank=old), 0.9)


def test_a_damaged_rerank_file_is_refused_naming_the_file_and_field(informative, tmp_path):
    b = _bundle_with(informative, tmp_path / "b")
    path = tmp_path / "b" / "fusion" / "rerank.json"
    for field, bad in (("region_km", "far"), ("features", "f"), ("backoff_below", "low")):
        stored = json.loads(path.read_text())
        path.write_text(json.dumps({**stored, field: bad}))
        with pytest.raises(BundleError, match=f"rerank.json.*{field}"):
            FusionModel.load(b)
        path.write_text(json.dumps(stored))


def world_with_blank_photos(n: int, seed: int, blank: float = 0.35) -> tuple[Evidence, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`world` where a share of the photos carry no location signal (indoor, generic: neighbours and cells
    anywhere, top similarity 0.3) and are taken, like most photos, around one hub; the prior lists its weighted
    points and then, weightless, the best constant guesses at 750 and 2500 km (the hub), as ``PriorSignal`` does.
    (evidence, truth, photographers, blank mask)."""
    ev, truth, groups = world(n, seed)
    rng = np.random.default_rng(seed + 100)
    hub = np.array([48.0, 5.0])
    is_blank = rng.random(n) < blank
    k = int(is_blank.sum())
    truth[is_blank] = _offset(np.repeat(hub[None], k, 0), rng.uniform(0, 900, k), rng)
    knn, cells = ev.signals["knn"], ev.signals["cells"]
    anywhere = lambda shape: np.stack([rng.uniform(-50, 60, shape), rng.uniform(-170, 170, shape)], -1)  # noqa: E731
    knn.latlon[is_blank], knn.score[is_blank] = anywhere((k, knn.width)), 0.3 + rng.normal(0, 0.01, (k, knn.width))
    cells.latlon[is_blank] = anywhere((k, cells.width))
    prior = ev.signals["prior"]
    ev.signals["prior"] = SignalEvidence(np.concatenate([prior.latlon, np.repeat(hub[None, None], n, 0).repeat(2, 1)], 1),
                                         np.concatenate([prior.score, np.zeros((n, 2))], 1))
    return ev, truth, groups, is_blank


@pytest.fixture(scope="module")
def blank() -> tuple[Evidence, np.ndarray, np.ndarray, FusionModel]:
    """A world where some photos carry no evidence, and fusion fitted on it (two tests read the one fit)."""
    ev, truth, groups, _ = world_with_blank_photos(900, seed=0)
    return ev, truth, groups, _fitted(ev, truth, groups)


def test_photos_without_evidence_are_answered_by_the_constant_guess(blank, tmp_path):
    """Where even the ranker's best candidate scores low (no usable evidence), the threshold chosen out of fold
    hands the photo to the prior's constant guess at 750 km; photos with evidence keep the ranker's answer. The
    file keeps the threshold, and one from before it never backs off."""
    model = blank[3]
    r = model.reranker
    assert r is not None and r.backoff_below is not None and model.params.rerank["backoff_share"] > 0.2
    new, new_truth, _, blank = world_with_blank_photos(400, seed=1)
    got = _answers(model.decide(new))
    at_hub = np.all(np.isclose(got, [48.0, 5.0]), axis=1)
    assert at_hub[blank].mean() > 0.9 and at_hub[~blank].mean() < 0.05
    assert [d.constant for d in model.decide(new)] == at_hub.tolist()  # the answer says it rests on the prior
    never = FusionModel(model.params, reranker=dataclasses.replace(r, backoff_below=None))
    without = _hits(_answers(never.decide(new)), new_truth)
    assert _hits(got, new_truth)[750] > without[750] + 0.1
    stored = r.to_dict()
    assert Reranker.from_dict(json.loads(json.dumps(stored))).backoff_below == r.backoff_below
    assert Reranker.from_dict({k: v for k, v in stored.items() if k != "backoff_below"}).backoff_below is None
    assert "the best constant guess answers" in learned_summary(model.params, 0.9)
    assert FusionModel.load(_bundle_with(model, tmp_path / "b")).decide(new) == model.decide(new)


def test_without_a_weightless_anchor_there_is_no_constant_guess_to_back_off_to(informative):
    ev, _, _ = world(50, seed=8)
    assert R.backoff_pick(ev) is None  # world's prior points all carry weight
    with_anchor, _, _, _ = world_with_blank_photos(50, seed=8)
    assert R.backoff_pick(with_anchor) == with_anchor.blocks()[-1].stop - 2


def test_the_build_log_states_the_share_of_the_answers_it_keeps(blank):
    """The build's line 'share of thresholds met A% -> B%' gives B for the answers kept, back-offs included."""
    import re

    ev, truth, groups, model = blank
    lines: list[str] = []
    reranker, report, km = R.fit_reranker(ev, model.params, truth, groups, log=lines.append)
    assert reranker is not None and report["backoff_share"] > 0
    shown = float(re.search(r"-> ([\d.]+)%", lines[0]).group(1))
    assert shown == pytest.approx(100 * thresholds_met(km).mean(), abs=0.05)
