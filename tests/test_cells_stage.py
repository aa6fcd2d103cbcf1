"""The cells stage end to end on a small synthetic gallery: bundle files, loading, posteriors, decisions."""
import json

import numpy as np
import pandas as pd
import pytest

from geo.core.geodesy import latlon_to_xyz
from geo.stages.cells.predictor import CellPredictor
from geo.stages.cells.stage import CellsConfig, fit_cells
from geo.store.bundle import Bundle, open_bundle

CENTRES = [(48.8, 2.3), (40.7, -74.0), (35.7, 139.7), (-33.9, 151.2), (-22.9, -43.2), (30.0, 31.2)]


def _gallery(n=600, dim=16, seed=0):
    """Photos around six cities; features know the city, authors are groups, scenes are labelled."""
    rng = np.random.default_rng(seed)
    city = rng.integers(0, len(CENTRES), n)
    lat = np.array([CENTRES[c][0] for c in city]) + rng.normal(0, 0.3, n)
    lon = np.array([CENTRES[c][1] for c in city]) + rng.normal(0, 0.3, n)
    proj = rng.normal(size=(3, dim))
    emb = latlon_to_xyz(lat, lon) @ proj * 3 + rng.normal(size=(n, dim))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    meta = pd.DataFrame({"id": [f"p{i}" for i in range(n)], "lat": lat, "lon": lon,
                         "AUTHOR": [f"a{i % 40}" for i in range(n)], "S3_Label": rng.integers(0, 3, n)})
    return meta, emb, city


def test_stage_writes_registers_and_predicts(tmp_path):
    meta, emb, city = _gallery()
    bundle = Bundle.create_or_resume(tmp_path, {"name": "test"}, emb.shape[1])
    fitted = fit_cells(meta, emb, CellsConfig(tau_min=3, tau_max=[200, 60, 20], max_epochs=15), log=lambda *_: None)
    files, info = fitted.save(bundle)
    bundle.commit("cells", files, info, replace=("cells/", "heads/"))
    assert info["group_column"] == "AUTHOR" and info["partitions"] == ["coarse", "middle", "fine"]
    files = open_bundle(tmp_path).manifest["files"]
    assert {"heads/heads.safetensors", "heads/heads.json", "cells/fine.parquet", "cells/support.parquet"} <= set(files)
    assert json.loads((tmp_path / "heads" / "heads.json").read_text())["calibration"]["alpha"] >= 0

    pred = CellPredictor.load(open_bundle(tmp_path))
    partitions, _ = pred.log_probs(emb[:50])
    assert all(np.allclose(np.exp(lp).sum(axis=1), 1) for lp in partitions)
    fine = pred.fine_probs(emb[:50])
    np.testing.assert_allclose(fine.sum(axis=1), 1, atol=1e-6)
    lat, lon, mass = pred.decide(fine)
    for i in range(50):
        top = pred.top_cells(fine[i], 3)
        assert [c["prob"] for c in top] == sorted([c["prob"] for c in top], reverse=True)
        assert set(top[0]) == {"partition", "token", "prob", "lat", "lon", "polygon"} and isinstance(top[0]["token"], str)
        ring = np.array(top[0]["polygon"])  # the cell's outline: a closed [lon, lat] ring around its photos' mean
        assert ring.shape == (5, 2) and (ring[0] == ring[-1]).all()
        assert ring[:, 0].min() <= top[0]["lon"] <= ring[:, 0].max() and ring[:, 1].min() <= top[0]["lat"] <= ring[:, 1].max()
        assert top[0]["prob"] - 1e-4 <= mass[i] <= 1 + 1e-9
    # The features know the city: the answer is in the right city for most gallery photos.
    hits = [abs(la - CENTRES[c][0]) < 2 and abs(lo - CENTRES[c][1]) < 2 for la, lo, c in zip(lat, lon, city[:50])]
    assert np.mean(hits) > 0.8


def test_training_is_reproducible():
    meta, emb, _ = _gallery(300)
    cfg = CellsConfig(tau_min=3, tau_max=[100, 30], scene_column="S3_Label", seed=1, max_epochs=5)
    a = fit_cells(meta, emb, cfg, log=lambda *_: None)
    b = fit_cells(meta, emb, cfg, log=lambda *_: None)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert np.array_equal(va.numpy(), vb.numpy()), k
    assert a.scene_values == [0, 1, 2]


def test_a_float16_sample_trains_the_heads_as_float32_does():
    """A large build holds its training sample in float16 (geo.core.memory.compact_rows): every stage of fit_cells
    (heads, calibration, regression, city head) casts a batch at a time, so the heads match float32's closely."""
    meta, emb, _ = _gallery(300)
    cfg = CellsConfig(tau_min=3, tau_max=[100, 30], seed=1, max_epochs=5)
    full = fit_cells(meta, emb, cfg, log=lambda *_: None)
    half = fit_cells(meta, emb.astype(np.float16), cfg, log=lambda *_: None)
    a, b = (np.exp(p.log_probs(emb[:100])[0][-1]) for p in (full, half))
    assert np.abs(a - b).max() < 0.05 and (a.argmax(1) == b.argmax(1)).mean() > 0.95


def test_scene_conditioned_heads_use_the_scene():
    """Paris and New York photos look alike here, but Paris ones are labelled indoor and New York ones urban:
    only heads that read the scene can tell them apart, so the true label must beat the swapped one."""
    meta, emb, city = _gallery(600)
    rng = np.random.default_rng(1)
    twins = city <= 1
    emb[twins] = emb[city == 0][rng.integers(0, (city == 0).sum(), twins.sum())]  # New York gets Paris's features
    meta["S3_Label"] = np.where(city == 0, 0, np.where(city == 1, 2, 1))
    pred = fit_cells(meta, emb, CellsConfig(tau_min=3, tau_max=[200, 60], scene_column="S3_Label", max_epochs=30),
                     log=lambda *_: None)
    assert pred.calibration["alpha"] > 0
    rows = np.flatnonzero(twins)
    label = meta["S3_Label"].to_numpy()[rows]

    def hits(scene):
        lat, lon, _ = pred.decide(pred.fine_probs(emb[rows], scene=scene))
        return np.mean([abs(la - CENTRES[c][0]) < 2 and abs(lo - CENTRES[c][1]) < 2 for la, lo, c in zip(lat, lon, city[rows])])

    assert hits(label) > 0.65  # ignoring the scene, half of these twins would go to the wrong city
    assert hits(2 - label) < 0.35  # indoor <-> urban swapped: the heads send each photo to the other city
    np.testing.assert_allclose(pred.fine_probs(emb[:5]).sum(axis=1), 1, atol=1e-6)  # no label: the predicted scene


def test_small_gallery_calibrates_on_every_photo_out_of_fold(monkeypatch):
    """A few held-out photographers are too few to fit T and alpha: below CALIBRATION_PHOTOS every photo is
    scored by heads trained without its photographer's fold; above it, the held-out split is enough."""
    import geo.stages.cells.stage as stage

    meta, emb, _ = _gallery(300)
    cfg = CellsConfig(tau_min=3, tau_max=[100, 30], max_epochs=3)
    fitted = fit_cells(meta, emb, cfg, log=lambda *_: None)
    calib, fine_photos = fitted.calibration, int(fitted.tables[-1]["count"].sum())
    assert "cross-fitted" in calib["source"] and calib["val_photos"] == fine_photos
    monkeypatch.setattr(stage, "CALIBRATION_PHOTOS", 10)
    calib = fit_cells(meta, emb, cfg, log=lambda *_: None).calibration
    assert calib["source"] == "the held-out photographers" and calib["val_photos"] < 0.5 * fine_photos
    monkeypatch.undo()
    calib = fit_cells(meta, emb, CellsConfig(tau_min=3, tau_max=[100, 30], max_epochs=3, crossfit=False),
                      log=lambda *_: None).calibration  # fusion's folds: no cross-fitting inside them
    assert calib["source"] == "the held-out photographers"


def test_missing_columns_are_named():
    meta, emb, _ = _gallery(100)
    with pytest.raises(ValueError, match="NOPE"):
        fit_cells(meta, emb, CellsConfig(scene_column="NOPE"), log=lambda *_: None)
    with pytest.raises(ValueError, match="embeddings"):
        fit_cells(meta, emb[:10], CellsConfig(), log=lambda *_: None)


def test_the_regression_head_answers_on_the_sphere_and_states_held_out_hit_rates():
    """Ridge onto unit vectors, normalised back: every answer is a valid place, even for embeddings far from
    any training photo, and features tied to location are learned."""
    from geo.stages.cells.regression import fit_regression

    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(-60, 70, 400), rng.uniform(-180, 180, 400)
    xyz = np.stack([np.cos(np.radians(lat)) * np.cos(np.radians(lon)), np.cos(np.radians(lat)) * np.sin(np.radians(lon)),
                    np.sin(np.radians(lat))], 1)
    emb = np.concatenate([xyz, rng.normal(0, 0.05, (400, 29))], 1).astype(np.float32)
    reg = fit_regression(emb, lat, lon, np.arange(400) % 40)
    assert reg.info["held_out_median_km"] < 500 and set(reg.info["p_within"]) == {"25", "200", "750"}
    plat, plon = reg.predict(rng.normal(0, 10, (50, 32)).astype(np.float32))
    assert np.all(np.abs(plat) <= 90) and np.all(np.abs(plon) <= 180) and np.isfinite(plat).all()
    assert reg.info["shrink"]["weight"] >= 0.5  # the signal transfers: the regression keeps most of its say


def test_a_regression_that_does_not_transfer_answers_the_prior():
    """Embeddings that say nothing about place: on held-out photos the regression loses to the constant guess,
    so its weight goes to 0 and --mode regression answers the population prior, never below it."""
    from geo.core.geodesy import haversine_km
    from geo.core.priors import population_prior
    from geo.stages.cells.regression import fit_regression

    rng = np.random.default_rng(1)
    city = rng.integers(0, len(CENTRES), 400)
    lat = np.array([CENTRES[c][0] for c in city]) + rng.normal(0, 0.3, 400)
    lon = np.array([CENTRES[c][1] for c in city]) + rng.normal(0, 0.3, 400)
    emb = rng.normal(size=(400, 32)).astype(np.float32)
    reg = fit_regression(emb, lat, lon, np.arange(400) % 40)
    assert reg.info["shrink"]["weight"] == 0.0 and reg.info["shrink"]["unshrunk_score"] < reg.info["shrink"]["held_out_score"]
    prior = population_prior(lat, lon)
    plat, plon = reg.predict(emb[300:])
    assert haversine_km(plat, plon, prior[0], prior[1]).max() < 1e-6


def test_the_ridge_from_fold_moments_is_the_ridge_on_the_rows_themselves(monkeypatch):
    """The regression solves every out-of-fold ridge from per-fold sums taken a block of rows at a time (no
    float64 copy of the gallery); with blocks smaller than a fold, the weights must equal a ridge fitted
    directly on the training rows."""
    from geo.stages.cells import regression as R

    monkeypatch.setattr(R, "CHUNK", 7)
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(60, 5)).astype(np.float32)
    y = rng.normal(size=(60, 3))
    fold = np.arange(60) % 3
    moments = R._moments(emb, y, fold, 3)
    fit = fold != 0
    x = emb[fit].astype(np.float64)
    xc, yc = x - x.mean(0), y[fit] - y[fit].mean(0)
    want = np.linalg.solve(xc.T @ xc + 2.0 * np.eye(5), xc.T @ yc)
    w, b = (R._total(moments) - moments[0]).ridge(2.0)
    assert np.allclose(w, want, atol=1e-10)
    assert np.allclose(b, y[fit].mean(0) - x.mean(0) @ want, atol=1e-10)


def test_a_ridge_on_fewer_photos_than_dimensions_is_the_ridge_from_their_moments():
    """Why: a small gallery's ridges are solved in the photos' space (an [m, m] system, not [dim, dim]); by the
    push-through identity the weights must be the ones the moments give."""
    from geo.stages.cells import regression as R

    rng = np.random.default_rng(3)
    emb = rng.normal(size=(40, 64)).astype(np.float32)
    y = rng.normal(size=(40, 3))
    fold = np.arange(40) % 3
    moments = R._moments(emb, y, fold, 3)
    rest, rows = R._total(moments) - moments[1], np.flatnonzero(fold != 1)
    for alpha in (1e-3, 2.0, 300.0):
        w, b = R._ridge(emb, y, rows, rest, alpha)
        want_w, want_b = rest.ridge(alpha)
        assert np.allclose(w, want_w, atol=1e-8) and np.allclose(b, want_b, atol=1e-8)
