"""What carried an answer: every answer says so, a prior-only answer is flagged, a duplicate is confident."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from geo.cli import app
from geo.core.answer import LOW_EVIDENCE
from geo.query.index import open_index

QUERY = sorted((Path(__file__).resolve().parents[1] / "examples" / "osv5m" / "queries").glob("*.jpg"))[0]


@pytest.fixture(scope="module")
def index(cli_bundle):
    return open_index(cli_bundle[1])


def _with_weights(index, **weights):
    params = index.fusion.params
    signals = {n: dataclasses.replace(sp, weight=weights.get(n, 0.0)) for n, sp in params.signals.items()}
    return dataclasses.replace(params, signals=signals)


def test_an_exact_duplicate_is_confident_within_25_km(index, cli_bundle):
    gallery = pd.read_csv(cli_bundle[0], dtype={"id": str})
    a = index.locate_one(gallery["path"][4])
    assert a.evidence["basis"] == "near-duplicate" and a.evidence["top_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert a.confidence >= 0.9 and a.confidence_radius_km == 25.0
    assert (a.lat, a.lon) == pytest.approx((gallery["latitude"][4], gallery["longitude"][4]), abs=1e-6)


def test_a_prior_only_answer_is_flagged_and_an_image_answer_is_not(index, monkeypatch):
    monkeypatch.setattr(index.fusion, "params", _with_weights(index, prior=1.0))
    a = index.locate_one(str(QUERY))
    assert a.evidence["basis"] == "prior" and a.evidence["signals"]["prior"] == pytest.approx(1.0)
    monkeypatch.setattr(index.fusion, "params", _with_weights(index, knn=0.9, prior=0.1))
    b = index.locate_one(str(QUERY))
    assert b.evidence["basis"] == "image" and b.evidence["signals"]["knn"] > 0.5


def test_the_human_line_says_when_the_answer_is_the_prior(cli_bundle, index):
    r = CliRunner().invoke(app, ["query", str(QUERY), "--index", str(cli_bundle[1])])
    a = index.locate_one(str(QUERY))
    assert r.exit_code == 0
    assert (LOW_EVIDENCE in r.output) == (a.evidence["basis"] == "prior")


def test_every_mode_answers_with_the_same_fields(index):
    keys = {m: set(index.locate_one(str(QUERY), mode=m).to_dict()) for m in index.modes}
    assert len({frozenset(k) for k in keys.values()}) == 1 and "evidence" in keys["fused"]
    for m in index.modes:
        ev = index.locate_one(str(QUERY), mode=m).evidence
        assert set(ev) == {"basis", "signals", "top_similarity"} and sum(ev["signals"].values()) == pytest.approx(1.0)


def test_answers_name_the_nearest_place_and_abstentions_do_not(index, cli_bundle):
    import numpy as np

    from geo.data.places import nearest_places

    paris, sydney, missing = nearest_places(np.array([48.853, -33.87, np.nan]), np.array([2.349, 151.21, 0.0]))
    assert (paris["name"], paris["cc"]) == ("Paris", "FR") and paris["distance_km"] < 1
    assert sydney["cc"] == "AU" and missing == {}
    gallery = pd.read_csv(cli_bundle[0], dtype={"id": str})
    for i in (3, 17, 40):  # a gallery photo asked again is answered at its spot: the place is its country's
        a = index.locate_one(gallery["path"][i])
        assert a.place["cc"] == gallery["country"][i] and 0 <= a.place["distance_km"] < 200  # steppe: 63 km
    withheld = index.locate_one(str(QUERY), min_confidence=1.01)
    assert withheld.abstained and withheld.lat is None and withheld.place == {}  # no location by another name


def test_every_mode_states_a_calibrated_probability_within_the_same_radii(index, cli_bundle):
    maps = index.fusion.params.mode_calibration
    assert set(maps) == {"knn", "gallery", "cells"} and all(set(m) == {"25", "200", "750"} for m in maps.values())
    for m in maps.values():
        for t in m.values():  # a calibration map: monotone, probabilities
            assert np.all(np.diff(t["y"]) >= 0) and 0 <= min(t["y"]) and max(t["y"]) <= 1
    gallery = pd.read_csv(cli_bundle[0], dtype={"id": str})
    for mode in index.modes:
        a = index.locate_one(str(QUERY), mode=mode)
        assert a.confidence_radius_km == 25.0 and set(a.p_within) == {"25", "200", "750"}, mode
        assert a.confidence == a.p_within["25"] and a.p_within["25"] <= a.p_within["200"] <= a.p_within["750"], mode
    twin = index.locate_one(gallery["path"][7], mode="knn")  # the exact duplicate, in a single mode too
    assert twin.confidence >= 0.9


def test_alternatives_carry_their_own_mass_and_ties_are_ordered_by_it(index):
    """Why (issue 27, finding 18): under the prior alone and a regional decision, every alternative of one region
    showed one identical score (its mass within 750 km), so three places read as one number."""
    from geo.stages.fusion.posterior import decide

    emb, _ = index.embed([str(QUERY)])
    params = dataclasses.replace(_with_weights(index, prior=1.0), decision="region")
    (d,) = decide(index.evidence(emb[:, 0], 50), params)
    alts = d.alternatives
    assert len(alts) >= 3 and all(set(a["mass"]) == {"25", "200", "750"} for a in alts)
    assert all(a["mass"]["750"] == pytest.approx(a["score"], abs=1e-4) for a in alts)  # region: the 750-km mass
    keys = [(a["score"], a["mass"]["25"], a["mass"]["200"]) for a in alts]
    assert keys == sorted(keys, key=lambda k: (-k[0], -k[1], -k[2]))  # ties ordered by the finer masses
    assert len(set(keys)) > len({k[0] for k in keys})  # some share a score and their own mass tells them apart


def test_one_photo_is_answered_on_one_thread_and_a_batch_on_all(index, monkeypatch):
    """One photo's products (here the cell heads') run in numpy and are memory-bound: one BLAS thread, so no
    second pool fights torch's; its kNN search runs with an OpenMP team of one. A batch keeps every thread."""
    import faiss

    import geo.models.heads as heads
    import geo.stages.cells.predictor as predictor
    from geo.core.runtime import NUMPY_ROWS
    from geo.stages.knn import KnnIndex
    from tests.test_gallery_encoder import blas_thread_counts

    seen, teams, real, search = [], [], heads.head_logits, KnnIndex.search
    monkeypatch.setattr(predictor, "head_logits", lambda *a: seen.append(blas_thread_counts()) or real(*a))
    monkeypatch.setattr(KnnIndex, "search", lambda *a: teams.append(faiss.omp_get_max_threads()) or search(*a))
    emb, _ = index.embed([str(QUERY)])
    before, team = blas_thread_counts(), faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(3)  # a team larger than one on any machine, so the test can fail
    try:
        index.locate_embeddings(emb)
        index.locate_embeddings(np.repeat(emb, NUMPY_ROWS + 1, axis=0))
        assert faiss.omp_get_max_threads() == 3
    finally:
        faiss.omp_set_num_threads(team)
    assert seen == [{1}, before] and blas_thread_counts() == before
    assert teams == [1, 3]
