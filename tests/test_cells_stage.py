"""The cells stage end to end on a small synthetic gallery: bundle files, loading, posteriors, decisions."""
import json

import numpy as np
import pandas as pd
import pytest

from geo.bundle import Bundle, open_bundle
from geo.cells.predict import CellPredictor
from geo.cells.stage import CellsConfig, build_cells_stage, fit_cells
from geo.geodesy import latlon_to_xyz

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
    info = build_cells_stage(bundle, meta, emb, CellsConfig(tau_min=3, tau_max=[200, 60, 20], max_epochs=15), log=lambda *_: None)
    assert info["group_column"] == "AUTHOR" and info["partitions"] == ["coarse", "middle", "fine"]
    files = open_bundle(tmp_path).manifest["files"]
    assert {"heads/heads.safetensors", "heads/heads.json", "cells/fine.parquet", "cells/support.parquet"} <= set(files)
    assert json.loads((tmp_path / "heads" / "heads.json").read_text())["calibration"]["alpha"] >= 0

    pred = CellPredictor.load(open_bundle(tmp_path))
    posts = pred.predict(emb[:50])
    for post in posts:
        assert abs(post.fine.sum() - 1) < 1e-6
        assert all(abs(p.sum() - 1) < 1e-6 for p in post.probs.values())
        top = post.top_cells(3)
        assert [c["prob"] for c in top] == sorted([c["prob"] for c in top], reverse=True)
        assert set(top[0]) == {"partition", "token", "prob", "lat", "lon"} and isinstance(top[0]["token"], str)
        lat, lon, mass = post.decide()
        assert top[0]["prob"] - 1e-9 <= mass <= 1 + 1e-9
    # The features know the city: the answer is in the right city for most gallery photos.
    hits = [min(abs(p.point[0] - CENTRES[c][0]), 99) < 2 for p, c in zip(posts, city[:50])]
    assert np.mean(hits) > 0.8


def test_training_is_reproducible_and_scene_conditioned():
    meta, emb, _ = _gallery(300)
    cfg = CellsConfig(tau_min=3, tau_max=[100, 30], scene_column="S3_Label", seed=1, max_epochs=5)
    a = fit_cells(meta, emb, cfg, log=lambda *_: None).predictor
    b = fit_cells(meta, emb, cfg, log=lambda *_: None).predictor
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert np.array_equal(va.numpy(), vb.numpy()), k
    assert a.scene_values == [0, 1, 2]
    with_label = a.predict(emb[:5], scene=meta["S3_Label"][:5])
    without = a.predict(emb[:5])
    assert all(abs(p.fine.sum() - 1) < 1e-6 for p in with_label + without)


def test_small_gallery_calibrates_on_every_photo_out_of_fold(monkeypatch):
    """A few held-out photographers are too few to fit T and alpha: below CALIBRATION_PHOTOS every photo is
    scored by heads trained without its photographer's fold; above it, the held-out split is enough."""
    import geo.cells.stage as stage

    meta, emb, _ = _gallery(300)
    cfg = CellsConfig(tau_min=3, tau_max=[100, 30], max_epochs=3)
    fitted = fit_cells(meta, emb, cfg, log=lambda *_: None)
    calib, fine_photos = fitted.predictor.calibration, int(fitted.predictor.tables[-1]["count"].sum())
    assert "cross-fitted" in calib["source"] and calib["val_photos"] == fine_photos
    monkeypatch.setattr(stage, "CALIBRATION_PHOTOS", 10)
    calib = fit_cells(meta, emb, cfg, log=lambda *_: None).predictor.calibration
    assert calib["source"] == "the held-out photographers" and calib["val_photos"] < 0.5 * fine_photos


def test_missing_columns_are_named():
    meta, emb, _ = _gallery(100)
    with pytest.raises(ValueError, match="NOPE"):
        fit_cells(meta, emb, CellsConfig(scene_column="NOPE"), log=lambda *_: None)
    with pytest.raises(ValueError, match="embeddings"):
        fit_cells(meta, emb[:10], CellsConfig(), log=lambda *_: None)
