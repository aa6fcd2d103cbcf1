"""The city head: classes from the gallery's own cities, honest held-out scores, saved with the cells stage;
answers use it only where it beats always answering its commonest class by a photographer-clustered SE."""
import dataclasses

import numpy as np
import pandas as pd

from geo.cli.info import _stage_line
from geo.core.answer import Answer
from geo.core.geodesy import latlon_to_xyz
from geo.data.places import cities_of
from geo.stages.cells.cities import ELSEWHERE, MIN_CITY_PHOTOS
from geo.stages.cells.predictor import CellPredictor
from geo.stages.cells.stage import CellsConfig, fit_cells
from geo.store.bundle import Bundle, open_bundle

CITY_CENTRES = np.array([(48.86, 2.35), (40.71, -74.0), (35.68, 139.7), (-22.9, -43.2), (30.04, 31.24), (52.52, 13.40)])


# The cell heads are not what these tests check (the city head trains apart): on noise they crept on for 100
# epochs, 5 of a test's 6 s.
CELL_EPOCHS = 10


def _gallery(n=600, dim=16, spread=0.01, seed=0):
    rng = np.random.default_rng(seed)
    city = rng.integers(0, len(CITY_CENTRES), n)
    lat = CITY_CENTRES[city, 0] + rng.normal(0, spread, n)
    lon = CITY_CENTRES[city, 1] + rng.normal(0, spread, n)
    emb = latlon_to_xyz(lat, lon) @ rng.normal(size=(3, dim)) * 3 + rng.normal(size=(n, dim))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    meta = pd.DataFrame({"id": [f"p{i}" for i in range(n)], "lat": lat, "lon": lon,
                         "AUTHOR": [f"a{i % 40}" for i in range(n)]})
    return meta, emb


def test_the_city_head_learns_the_galleries_cities_and_says_how_well(tmp_path):
    meta, emb = _gallery()
    fitted = fit_cells(meta, emb, CellsConfig(tau_min=3, tau_max=[200, 60, 20], max_epochs=CELL_EPOCHS), log=lambda *_: None)
    head = fitted.city_head
    info = fitted.info["city_head"]
    names = head.cities["city"].tolist()
    assert names[-1] == ELSEWHERE and {"Paris, Ile-de-France, FR", "Tokyo, Tokyo, JP"} <= set(names)
    assert (head.cities["photos"][:-1] >= MIN_CITY_PHOTOS).all()
    # held-out photographers: far above always answering the most common city
    assert info["held_out_acc"] > info["majority_acc"] + 0.5
    assert info["used"] is True and "not_used_because" not in info and "not used" not in _stage_line("cells", fitted.info)
    bundle = Bundle.create_or_resume(tmp_path, {"name": "test"}, emb.shape[1])
    files, saved = fitted.save(bundle)
    assert {"heads/cities.safetensors", "heads/cities.json", "heads/cities.parquet"} <= set(files)
    bundle.commit("cells", files, saved, replace=("cells/", "heads/"))
    loaded = CellPredictor.load(open_bundle(tmp_path)).city_head
    np.testing.assert_allclose(loaded.probs(emb[:50]), head.probs(emb[:50]), atol=1e-6)
    truth = cities_of(meta["lat"][:50], meta["lon"][:50])
    tops = [loaded.top(p) for p in loaded.probs(emb[:50])]
    assert all(len(t) == 3 and t[0]["prob"] >= t[1]["prob"] >= t[2]["prob"] for t in tops)
    assert np.mean([t[0]["city"] == c for t, c in zip(tops, truth)]) > 0.7
    assert loaded.answer_cities(emb[:50]) == tops
    # a head recorded before the check (no "used" flag) keeps answering as it did
    old = dataclasses.replace(loaded, info={k: v for k, v in loaded.info.items() if k not in ("used", "clustered_se")})
    assert old.used and old.answer_cities(emb[:50]) == tops


def test_a_head_that_learned_noise_is_kept_but_answers_name_no_cities(tmp_path):
    meta, emb = _gallery()
    emb = emb[np.random.default_rng(3).permutation(len(emb))]  # embeddings say nothing about the city
    fitted = fit_cells(meta, emb, CellsConfig(tau_min=3, tau_max=[200, 60, 20], max_epochs=CELL_EPOCHS), log=lambda *_: None)
    info = fitted.info["city_head"]
    assert info["used"] is False
    assert info["held_out_acc"] - info["majority_acc"] <= info["clustered_se"]
    assert fitted.city_head.answer_cities(emb[:20]) == [[]] * 20
    line = _stage_line("cells", fitted.info)
    assert f"not used: held-out top-1 {100 * info['held_out_acc']:.1f}% does not beat" in line
    assert f"'{info['majority_class']}'" in line
    bundle = Bundle.create_or_resume(tmp_path, {"name": "test"}, emb.shape[1])
    files, saved = fitted.save(bundle)
    bundle.commit("cells", files, saved, replace=("cells/", "heads/"))
    loaded = CellPredictor.load(open_bundle(tmp_path)).city_head
    assert not loaded.used and loaded.answer_cities(emb[:5]) == [[]] * 5


def test_a_gallery_without_two_cities_has_no_city_head():
    meta, emb = _gallery(n=200)
    meta["lat"], meta["lon"] = -60.0 + meta["lat"] * 0.0, -140.0 + meta["lon"] * 0.0  # the open Southern Ocean
    fitted = fit_cells(meta, emb, CellsConfig(tau_min=3, tau_max=[150, 40]), log=lambda *_: None)
    assert fitted.city_head is None and fitted.info["city_head"] is None


def test_an_abstained_answer_names_no_city():
    a = Answer(image="x.jpg", lat=1.0, lon=2.0, confidence=0.1, city="Paris, Ile-de-France, FR",
               cities=[{"city": "Paris, Ile-de-France, FR", "prob": 0.4}]).abstain_below(0.5)
    assert a.abstained and a.cities == [] and a.city is None
