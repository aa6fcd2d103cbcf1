"""Gallery stage: training on stored embeddings, bundle files, and search."""
from __future__ import annotations

import dataclasses

import faiss
import numpy as np
import pandas as pd
import pytest

from geo.core.geodesy import haversine_km
from geo.core.priors import photos_within
from geo.stages.gallery.stage import (
    FILES,
    GalleryConfig,
    GpsGallery,
    encode_points,
    fit_gallery,
    gallery_points,
    resolve_image_init,
)
from geo.stages.gallery.stage import with_photos as gallery_with_photos
from geo.stages.gallery.train import TUNED, jitter, log_density
from geo.store.bundle import Bundle, BundleError, open_bundle

CITIES = np.array([[48.85, 2.35], [40.71, -74.0], [35.68, 139.69]])  # Paris, New York, Tokyo


def city_data(n_per: int = 40, dim: int = 16, seed: int = 0):
    """Embeddings that carry their city in one direction each, photographers nested in cities."""
    rng = np.random.default_rng(seed)
    city = np.repeat(np.arange(3), n_per)
    emb = rng.standard_normal((len(city), dim)).astype(np.float32) * 0.3
    emb[np.arange(len(city)), city] += 2.0
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    latlon = CITIES[city] + rng.normal(0, 0.05, (len(city), 2))
    meta = pd.DataFrame({"id": [f"p{i}" for i in range(len(city))], "lat": latlon[:, 0], "lon": latlon[:, 1],
                         "AUTHOR": [f"a{c}_{i % 8}" for i, c in enumerate(city)]})
    return meta, emb, city


def build_gallery(bundle: Bundle, meta: pd.DataFrame, emb: np.ndarray, config: GalleryConfig) -> dict:
    """Fit the gallery, save it and commit the stage, as the pipeline does; returns the full info it recorded."""
    gal = fit_gallery(meta, emb, config, str(bundle.manifest["backbone"]["name"]), log=lambda *_: None)
    files, summary = gal.save(bundle)
    assert sorted(files) == sorted(FILES.values())
    assert summary["best_epoch"] == gal.info["train"].get("best_epoch") and "train" not in summary
    bundle.commit("gallery", files, summary, replace=("gallery/",))
    return gal.info


SMALL = GalleryConfig(init="random", sigmas=(1.0, 16.0), epochs=8, batch_size=32, lr=3e-3, location_lr=0.0,
                      hidden=64, dropout=0.0, jitter_km=5.0, patience=12, device="cpu")


def test_jitter_stays_on_the_globe_and_near():
    import torch

    ll = torch.tensor([[89.99, 179.99], [0.0, 0.0]] * 50)
    out = jitter(ll, 10.0, torch.Generator().manual_seed(0)).numpy()
    assert (np.abs(out[:, 0]) <= 90).all() and (np.abs(out[:, 1]) <= 180).all()
    assert haversine_km(ll[1::2, 0], ll[1::2, 1], out[1::2, 0], out[1::2, 1]).max() < 80


def test_log_density_counts_nearby_photos():
    d = log_density(np.array([[48.85, 2.35], [0.0, -30.0]]), CITIES[[0, 0, 0, 1]], radius_km=100)
    assert d[0] == pytest.approx(np.log(4)) and d[1] == 0


def test_photos_within_scales_subsampled_counts_to_all_photos():
    rng = np.random.default_rng(0)
    photos = np.vstack([np.repeat(CITIES[[0]], 1000, axis=0), CITIES[[1]] + rng.normal(0, 0.01, (1000, 2))])
    points = np.array([CITIES[0], CITIES[1], [0.0, -30.0]])
    exact = photos_within(points, photos, radius_km=100, max_photos=len(photos))
    assert exact.tolist() == [1000, 1000, 0]
    sub = photos_within(points, photos, radius_km=100, max_photos=200)  # a 10% sample, counted and scaled back up
    assert sub[0] == pytest.approx(1000, rel=0.25) and sub[1] == pytest.approx(1000, rel=0.25) and sub[2] == 0
    assert sub.sum() == pytest.approx(2000)  # every sampled photo is near one of the points: scale is exact
    same = photos_within(CITIES[[0]], np.repeat(CITIES[[0]], 1000, axis=0), radius_km=1, max_photos=100)
    assert same[0] == pytest.approx(1000)


def test_build_and_search(tmp_path):
    meta, emb, _ = city_data()
    csv = tmp_path / "extra.csv"
    pd.DataFrame({"LAT": [-33.87, 48.85], "LON": [151.21, 2.35]}).to_csv(csv, index=False)
    bundle = Bundle.create_or_resume(tmp_path / "b", {"name": "test"}, emb.shape[1])
    info = build_gallery(bundle, meta, emb, dataclasses.replace(SMALL, gps_gallery=str(csv)))

    assert info["sources"] == {"photos": 120, "extra:extra.csv": 2}
    assert info["config"]["group_column"] == "AUTHOR"
    assert info["train"]["n_val"] > 0 and info["train"]["best_epoch"] > 0
    assert bundle.stage("gallery")["sources"] == info["sources"]
    b = open_bundle(tmp_path / "b")  # every file registered with its hash
    assert {f for f in b.manifest["files"] if f.startswith("gallery/")} == {
        "gallery/location_encoder.safetensors", "gallery/image_projection.safetensors", "gallery/gallery.json",
        "gallery/points.parquet", "gallery/gallery.faiss"}

    gal = GpsGallery.load(b, with_location_encoder=True)
    latlon, scores = gal.search(emb, k=5)
    assert latlon.shape == (120, 5, 2) and scores.shape == (120, 5)
    assert (np.diff(scores, axis=1) <= 1e-5).all()
    err = haversine_km(meta.lat, meta.lon, latlon[:, 0, 0], latlon[:, 0, 1])
    assert (err <= 750).mean() > 0.9  # the embedding says which city; the gallery must hear it

    # Scores are logits (+ the stored prior): recompute the best one from the modules.
    q = gal.projection.encode(emb[:1], normalize=True)
    p = gal.location_encoder.encode(latlon[0, :1], normalize=True)
    prior = TUNED.prior_weight * log_density(latlon[0, :1], meta[["lat", "lon"]].to_numpy(), TUNED.prior_radius_km)
    assert scores[0, 0] == pytest.approx(gal.logit_scale * float((q @ p.T)[0, 0]) + prior[0], abs=1e-3)


def test_rebuild_replaces_gallery_files(tmp_path):
    meta, emb, _ = city_data(n_per=10)
    bundle = Bundle.create_or_resume(tmp_path, {"name": "test"}, emb.shape[1])
    cfg = dataclasses.replace(SMALL, epochs=0)
    build_gallery(bundle, meta, emb, cfg)
    build_gallery(bundle, meta, emb, cfg)
    open_bundle(tmp_path).verify()


def test_missing_gallery_names_the_file(tmp_path):
    meta, emb, _ = city_data(n_per=5)
    bundle = Bundle.create_or_resume(tmp_path, {"name": "test"}, emb.shape[1])
    with pytest.raises(BundleError, match="gallery"):
        GpsGallery.load(bundle)
    build_gallery(bundle, meta, emb, dataclasses.replace(SMALL, epochs=0))
    (tmp_path / "gallery" / "gallery.faiss").unlink()
    with pytest.raises(BundleError, match="gallery.faiss"):
        GpsGallery.load(bundle)


def test_a_bundle_that_recorded_since_removed_settings_still_takes_new_photos():
    """Bundles built before the tuned constants left the config recorded them in gallery.json; ``geo add``
    (with_photos) rebuilds the points from that record, so it must ignore them and use the same constants."""
    meta, emb, _ = city_data(n_per=10)
    gal = fit_gallery(meta, emb, dataclasses.replace(SMALL, epochs=0), "test", log=lambda *_: None)
    assert gal.info["config"]["image_init"] == "random" and "prior_weight" not in gal.info["config"]
    gal.info["config"].update(prior_weight=2.0, prior_radius_km=750.0, queue_size=4096, symmetric=False,
                              val_fraction=0.2, weight_decay=0.01)
    fresh = gallery_with_photos(gal, meta[["lat", "lon"]].to_numpy())
    assert fresh.index.ntotal == gal.index.ntotal
    np.testing.assert_allclose(fresh.search(emb[:5], k=3)[1], gal.search(emb[:5], k=3)[1], rtol=1e-5)


def test_gallery_points_dedupe_and_bad_csv(tmp_path):
    pts, src = gallery_points(np.array([[1.0, 2.0], [1.0, 2.0], [3.0, 4.0]]), None)
    assert len(pts) == 2 and set(src) == {"photos"}
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match="bad.csv"):
        gallery_points(pts, str(bad))


def test_image_init_follows_backbone():
    assert GalleryConfig().image_init == "auto"  # one declaration: the stage and its training agree
    assert GalleryConfig().train_config("geoclip", 512).image_init == "identity"
    assert resolve_image_init("geoclip", 512) == "identity"
    assert resolve_image_init("open_clip:ViT-L-14/openai", 768) == "geoclip"
    assert resolve_image_init("efficientnet_lite0", 1280) == "random"


def test_each_epoch_reports_its_time_and_what_is_left(capsys):
    """A 100K gallery takes minutes an epoch on a CPU: a bar says how long the rest may take (its ETA), and
    --verbose adds each epoch's metrics as a line."""
    from geo.core.progress import showing
    from geo.stages.gallery.train import train_gallery

    meta, emb, _ = city_data(n_per=10)
    lines: list[str] = []
    cfg = dataclasses.replace(SMALL, epochs=3, patience=10).train_config("test", emb.shape[1])
    with showing(bars=True, verbose=True):
        result = train_gallery(emb, meta[["lat", "lon"]].to_numpy(), meta["AUTHOR"].to_numpy(), cfg,
                               log=lines.append)
    history = result.metrics["history"]
    assert len(history) == 3 and all(h["seconds"] > 0 for h in history)
    assert sum(h["seconds"] for h in history) <= result.metrics["seconds"] + 0.005  # the total is rounded to 0.01 s
    bar = capsys.readouterr().err
    # off a terminal the bar is whole lines (its start, every 10 s, its end): done, ETA, rate
    assert "0/3 [" in bar and "3/3 [" in bar and "<00:0" in bar and "round/s" in bar
    assert [line.split(":")[0] for line in lines] == ["gallery epoch 1", "gallery epoch 2", "gallery epoch 3"]


@pytest.mark.parametrize("location_lr", [0.0, 1e-3])
def test_a_frozen_location_encoder_is_encoded_once_for_validation(monkeypatch, location_lr):
    """By default the location encoder is frozen: it leaves training as it started and the validation candidates are
    encoded once for every round; a training encoder changes and its candidates are encoded again each round."""
    import torch

    from geo.models.location import LocationEncoder
    from geo.stages.gallery.train import build_modules, train_gallery

    assert GalleryConfig().encoder_lr == 0.0 and GalleryConfig(init="random").encoder_lr > 0  # frozen only from GeoCLIP
    meta, emb, _ = city_data(n_per=10)
    cfg = dataclasses.replace(SMALL, epochs=3, patience=10, location_lr=location_lr).train_config("test", emb.shape[1])
    torch.manual_seed(cfg.seed)
    start = build_modules(cfg, emb.shape[1])[0].state_dict()
    calls = []
    encode = LocationEncoder.encode
    monkeypatch.setattr(LocationEncoder, "encode", lambda self, *a, **k: calls.append(1) or encode(self, *a, **k))
    result = train_gallery(emb, meta[["lat", "lon"]].to_numpy(), meta["AUTHOR"].to_numpy(), cfg, log=lambda *_: None)
    same = all(torch.equal(v, start[k]) for k, v in result.location_encoder.state_dict().items())
    assert result.metrics["epochs_run"] == 3
    assert (same, len(calls)) == ((True, 1) if location_lr == 0 else (False, 4))  # the start's check and 3 rounds'


def test_a_float16_sample_trains_the_gallery_as_float32_does():
    """A large build holds its training sample in float16 (geo.core.memory.compact_rows); training casts each batch
    to float32, so the result is the float32 sample's to float16's rounding, not a different model."""
    from geo.stages.gallery.train import train_gallery

    meta, emb, _ = city_data(n_per=20)
    cfg = dataclasses.replace(SMALL, epochs=3, patience=10).train_config("test", emb.shape[1])
    latlon, groups = meta[["lat", "lon"]].to_numpy(), meta["AUTHOR"].to_numpy()
    full = train_gallery(emb, latlon, groups, cfg, log=lambda *_: None)
    half = train_gallery(emb.astype(np.float16), latlon, groups, cfg, log=lambda *_: None)
    assert half.metrics["epochs_run"] == full.metrics["epochs_run"] == 3
    a, b = (r.image_projection.encode(emb, normalize=True) for r in (full, half))
    assert np.abs(a - b).max() < 0.02 and not np.array_equal(a, b)


def test_new_photos_encode_only_their_new_places(monkeypatch, tmp_path):
    """``geo add`` and fusion's held-out scoring rebuild a saved gallery over another set of places: the places
    it already holds keep their features (the encoder is not run on them again), the new ones are encoded,
    and the index is the one a full re-encode gives."""
    meta, emb, _ = city_data(n_per=10)
    bundle = Bundle.create_or_resume(tmp_path, {"name": "test"}, emb.shape[1])
    build_gallery(bundle, meta, emb, dataclasses.replace(SMALL, epochs=0))
    gal = GpsGallery.load(bundle, with_location_encoder=True)
    more = meta[["lat", "lon"]].to_numpy()[:4] + 0.5  # four places the gallery has not seen
    places = np.concatenate([meta[["lat", "lon"]].to_numpy()[5:], more])  # and five of its own gone
    encoded = []
    encode = type(gal.location_encoder).encode
    monkeypatch.setattr(type(gal.location_encoder), "encode",
                        lambda self, latlon, **kw: encoded.append(len(latlon)) or encode(self, latlon, **kw))
    grown = gallery_with_photos(gal, places)
    assert encoded == [4]
    vectors = grown.index.reconstruct_n(0, grown.index.ntotal)
    everything = encode_points(gal.location_encoder, gal.projection, grown.points, places,
                               dataclasses.replace(SMALL, epochs=0))  # every place encoded, as before
    np.testing.assert_allclose(vectors, everything.reconstruct_n(0, everything.ntotal), rtol=0, atol=1e-6)


def test_a_gallery_above_the_exact_size_is_searched_through_ivf(monkeypatch, tmp_path):
    """Above EXACT_POINTS the gallery is an IVF index visiting a quarter of its lists: recorded in gallery.json,
    kept by a save and load, exact when it visits every list, widened under a constraint, and grown by
    ``geo add`` (which copies the known points' vectors out of it)."""
    from geo.stages.gallery import stage

    monkeypatch.setattr(stage, "EXACT_POINTS", 50)
    meta, emb, city = city_data()
    bundle = Bundle.create_or_resume(tmp_path, {"name": "test"}, emb.shape[1])
    info = build_gallery(bundle, meta, emb, dataclasses.replace(SMALL, epochs=1))
    assert (info["index"], info["nprobe"]) == ("IVF8,Flat", 2)  # sqrt(120) ~ 8 lists, a quarter visited
    gal = GpsGallery.load(bundle, with_location_encoder=True)
    ivf = faiss.extract_index_ivf(gal.index)
    assert (ivf.nlist, ivf.nprobe) == (8, 2)

    vectors = gal.index.reconstruct_n(0, gal.index.ntotal)
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    q = np.hstack([gal.projection.encode(emb, normalize=True), np.ones((len(emb), 1), np.float32)])
    ivf.nprobe = ivf.nlist
    np.testing.assert_allclose(gal.index.search(q, 5)[0], exact.search(q, 5)[0], rtol=0, atol=1e-5)
    ivf.nprobe = 2

    tokyo = np.flatnonzero(haversine_km(gal.points[:, 0], gal.points[:, 1], *CITIES[2]) < 100)
    latlon, scores = gal.within(tokyo).search(emb[city == 0], k=5)  # Paris photos, Tokyo's points only
    assert np.isfinite(scores).all()  # every list visited: five points found for every photo
    assert (haversine_km(latlon[..., 0], latlon[..., 1], *CITIES[2]) < 100).all()

    grown = gallery_with_photos(gal, np.concatenate([meta[["lat", "lon"]].to_numpy(), CITIES + 1.0]))
    assert grown.index.ntotal == 123 and grown.info["index"] == "IVF8,Flat" and grown.info["n_points"] == 123
    # the known places' features copied out of the IVF index (their prior column counts the new photos too)
    row = {tuple(p): i for i, p in enumerate(grown.points.tolist())}
    kept = grown.index.reconstruct_batch(np.array([row[tuple(p)] for p in gal.points.tolist()]))
    np.testing.assert_allclose(kept[:, :-1], vectors[:, :-1], rtol=0, atol=1e-6)
