"""Region answers: conformal thresholds, coverage on new photographers, compact tokens, GeoJSON, columns."""
import json

import numpy as np
import pandas as pd
import pytest

from geo.core.answer import Answer
from geo.core.geodesy import latlon_to_xyz
from geo.store.bundle import BundleError
from geo.store.schema import checked
from geo.stages.cells.partition import locate, partitions_from_tables
from geo.stages.cells.region import GRID, REGION_MAP, REPORT_COVERAGES, RegionCells, conformal_map, mass_threshold
from geo.stages.cells.stage import CellsConfig, _own_counts, fit_cells

CENTRES = [(48.8, 2.3), (40.7, -74.0), (35.7, 139.7), (-33.9, 151.2), (-22.9, -43.2), (30.0, 31.2)]


def _world(n, seed, authors=0, dim=16):
    """Photos of 200 photographers, each at a few of 40 spots near six cities; the features know the place,
    noisily. New photographers (another seed) go to the same spots, as visitors do to a region's sights."""
    rng = np.random.default_rng(seed)
    world = np.random.default_rng(99)
    proj = world.normal(size=(3, dim))
    spots = np.array([CENTRES[c] for c in world.integers(0, len(CENTRES), 40)]) + world.normal(0, 0.8, (40, 2))
    visits = rng.integers(0, 40, (200, 3))  # each photographer's spots
    who = rng.integers(0, 200, n)
    at = spots[visits[who, rng.integers(0, 3, n)]]
    lat, lon = at[:, 0] + rng.normal(0, 0.15, n), at[:, 1] + rng.normal(0, 0.15, n)
    emb = latlon_to_xyz(lat, lon) @ proj * 6 + rng.normal(size=(n, dim))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    return pd.DataFrame({"id": [f"p{seed}-{i}" for i in range(n)], "lat": lat, "lon": lon,
                         "AUTHOR": [f"a{authors + w}" for w in who]}), emb


@pytest.fixture(scope="module")
def fitted():
    meta, emb = _world(1500, seed=0)
    pred = fit_cells(meta, emb, CellsConfig(tau_min=3, tau_max=[300, 80, 25], max_epochs=20), log=lambda *_: None)
    return pred, _world(1500, seed=1, authors=1000)  # new photographers, the same world


def test_fusions_out_of_fold_fits_make_no_region_map():
    meta, emb = _world(300, seed=3)
    pred = fit_cells(meta, emb, CellsConfig(tau_min=3, tau_max=[100, 30], max_epochs=2, crossfit=False,
                                            answer_heads=False), log=lambda *_: None)
    assert "region" not in pred.calibration and "region" not in pred.info["calibration"]
    assert pred.regions(pred.fine_probs(emb[:1]), 0.9)[0]["calibrated"] is False


def test_the_conformal_map_takes_the_corrected_quantile_and_never_less_coverage_than_asked():
    scores = np.arange(1, 100) / 100.0  # 99 photos, scores .01 .. .99
    cmap = conformal_map(scores)
    assert cmap["photos"] == 99 and len(cmap["mass"]) == len(GRID)
    assert np.all(np.diff(cmap["mass"]) >= 0)  # more coverage never asks for less mass
    assert mass_threshold(0.9, cmap) == (0.9, True)  # ceil(100 * 0.9) = 90th smallest score
    assert mass_threshold(0.5, cmap)[0] == 0.5
    assert mass_threshold(0.901, cmap)[0] == pytest.approx(0.91)  # between grid levels: the next one up
    assert mass_threshold(0.999, cmap)[0] == 1.0  # beyond what 99 photos can promise: the whole posterior
    assert conformal_map(np.full(10, np.inf))["mass"][-1] == 1.0  # truths in no cell: never an infinite threshold
    assert mass_threshold(0.8, None) == (0.8, False)  # an older bundle: the posterior mass, said to be uncalibrated
    with pytest.raises(ValueError, match="coverage"):
        mass_threshold(0.0, cmap)


def _confidence_scores(n, seed):
    """Photos whose conformal score depends on the posterior's confidence: a confident photo's truth lies early."""
    rng = np.random.default_rng(seed)
    top = rng.random(n)
    return rng.random(n) ** (1 + 6 * top), top


def test_a_map_binned_by_confidence_holds_the_stated_rate_overall_and_within_each_bin():
    scores, top = _confidence_scores(20_000, seed=0)
    binned, one = conformal_map(scores, top), conformal_map(scores)
    assert len(binned["top"]) == 4 and len(binned["bin_mass"]) == 5 and "top" not in one
    assert binned["mass"] == one["mass"]  # the one threshold for every photo is kept (older readers, the manifest)
    new, new_top = _confidence_scores(20_000, seed=1)  # new photos from the same law
    fifth = np.searchsorted(np.quantile(new_top, [0.2, 0.4, 0.6, 0.8]), new_top, side="right")
    for c in (0.5, 0.9):
        held = new <= np.array([mass_threshold(c, binned, t)[0] for t in new_top]) + 1e-12
        plain = new <= mass_threshold(c, one)[0] + 1e-12
        assert abs(held.mean() - c) < 0.015 and abs(plain.mean() - c) < 0.015
        by_fifth = np.array([held[fifth == k].mean() for k in range(5)])
        plain_by_fifth = np.array([plain[fifth == k].mean() for k in range(5)])
        assert np.abs(by_fifth - c).max() < 0.05 < np.abs(plain_by_fifth - c).max()
    # a confident photo gets a smaller region than an uncertain one at the same stated coverage
    assert mass_threshold(0.9, binned, 0.99)[0] < mass_threshold(0.9, binned, 0.01)[0]
    # an older map (no bins) answers every photo with its one threshold, whatever its confidence
    assert mass_threshold(0.9, one, 0.99) == mass_threshold(0.9, one) == mass_threshold(0.9, one, 0.01)
    # heads.json holds either shape; a binned map whose bins are not lists of numbers does not load
    stored = json.loads(json.dumps(binned))
    assert checked(stored, REGION_MAP, "heads.json") and checked(json.loads(json.dumps(one)), REGION_MAP, "heads.json")
    with pytest.raises(BundleError, match="bin_mass"):
        checked({**stored, "bin_mass": [0.5, 0.9]}, REGION_MAP, "heads.json")


def test_a_map_of_few_photos_or_tied_confidences_has_no_bins():
    scores, top = _confidence_scores(1_500, seed=0)
    assert "top" not in conformal_map(scores, top)  # under 2 bins of 500 photos on each half
    scores, _ = _confidence_scores(20_000, seed=0)
    assert "top" not in conformal_map(scores, np.full(20_000, 0.3))  # the prior alone: every photo as confident


def test_the_map_scored_a_block_of_photos_at_a_time_is_the_map_of_all_at_once(monkeypatch):
    """The stage scores its held-out photos REGION_BLOCK at a time (their logits whole were a 150K build's peak);
    a photo's score does not depend on its block, so any block size gives the same map."""
    import geo.stages.cells.stage as stage

    meta, emb = _world(1200, seed=4)
    cfg = CellsConfig(tau_min=3, tau_max=[300, 80, 25], max_epochs=3)
    maps = []
    for block in (1 << 20, 37):
        monkeypatch.setattr(stage, "REGION_BLOCK", block)
        maps.append(fit_cells(meta, emb, cfg, log=lambda *_: None).calibration["region"])
    assert maps[0]["photos"] > 2 * 37 and json.dumps(maps[0], sort_keys=True) == json.dumps(maps[1], sort_keys=True)


def test_calibration_and_validation_scored_in_blocks_match_all_photos_at_once(monkeypatch):
    """The heads' validation loss (VAL_BLOCK) and the temperature and alpha search (CALIBRATION_BLOCK) hold a
    block of photos' [photos, cells] arrays at a time (all at once they were a 150K build's cells peak): the same
    temperatures, alpha and likelihood, and the same validation losses up to float summation order."""
    import geo.stages.cells.calibration as calibration
    import geo.stages.cells.train as train

    meta, emb = _world(1200, seed=4)
    cfg = CellsConfig(tau_min=3, tau_max=[300, 80, 25], max_epochs=3)
    fitted = []
    for block in (1 << 20, 37):
        monkeypatch.setattr(calibration, "CALIBRATION_BLOCK", block)
        monkeypatch.setattr(train, "VAL_BLOCK", block)
        fitted.append(fit_cells(meta, emb, cfg, log=lambda *_: None))
    whole, blocks = (f.info for f in fitted)
    assert whole["calibration"]["val_photos"] > 2 * 37
    for key in ("temperature", "alpha", "val_nll_fine"):
        assert whole["calibration"][key] == blocks["calibration"][key], key
    assert whole["train"]["best_epoch"] == blocks["train"]["best_epoch"]
    assert whole["train"]["val_loss"] == pytest.approx(blocks["train"]["val_loss"], rel=1e-6)


def test_held_out_photos_are_scored_without_their_own_photographers_gallery_photos():
    from types import SimpleNamespace

    rows = np.array([[0, 0], [0, 1], [1, 2], [1, 2], [0, 1], [-1, -1]])  # 6 training photos, 2 partitions
    cells = SimpleNamespace(rows=rows, all_rows=np.zeros((12, 2)), tables=[pd.DataFrame(index=range(2)),
                                                                            pd.DataFrame(index=range(3))])
    groups = np.array(["a", "b", "a", "a", "c", "a"])
    own, photographer = _own_counts(cells, np.array([2, 0]), groups)  # the map's photos: both a's
    assert own.shape == (1, 3) and photographer.tolist() == [0, 0]
    # a's photos in each fine cell, all four of them (not only the map's two), x2: the heads saw half the gallery
    assert own.toarray().tolist() == [[2.0, 0.0, 4.0]]
    own, photographer = _own_counts(cells, np.array([2, 4]), None)  # no photographers: each photo its own
    assert own.toarray().tolist() == [[0.0, 0.0, 2.0], [0.0, 2.0, 0.0]] and photographer.tolist() == [0, 1]


def test_the_truth_lies_inside_at_the_stated_rate_for_new_photographers(fitted):
    pred, (meta, emb) = fitted
    # fitted on the held-out photographers, scored by the heads that answer
    assert pred.calibration["region"]["photos"] == pred.info["train"]["val_photos"] > 200
    probs = pred.fine_probs(emb)
    lat, lon = meta["lat"].to_numpy(), meta["lon"].to_numpy()
    rc = pred.region_cells
    observed, areas = [], []
    for c in (0.5, 0.8, 0.9):
        regions = [rc.region(p, c, pred.calibration["region"]) for p in probs]
        observed.append(rc.contains([r.tokens for r in regions], lat, lon).mean())
        areas.append(np.median([r.area_km2 for r in regions]))
    assert abs(observed[0] - 0.5) < 0.08 and abs(observed[1] - 0.8) < 0.06 and abs(observed[2] - 0.9) < 0.04
    assert observed == sorted(observed) and areas == sorted(areas) and areas[0] > 0
    # the raw posterior mass is no coverage: the map moves it
    assert pred.calibration["region"]["mass"] != pred.calibration["region"]["coverage"]


def test_regions_grow_with_the_stated_coverage_and_list_coarse_cells_for_whole_parents(fitted):
    pred, (meta, emb) = fitted
    rc = pred.region_cells
    row = pred.fine_probs(emb[:1])[0]
    regions = [rc.region(row, c, pred.calibration["region"]) for c in (0.3, 0.5, 0.8, 0.9, 0.99)]
    held = [rc.contains([r.tokens] * len(meta), meta["lat"], meta["lon"]) for r in regions]
    for (small, big), (a, b) in zip(zip(regions, regions[1:]), zip(held, held[1:])):
        assert small.mass <= big.mass and small.area_km2 <= big.area_km2 and not (a & ~b).any()  # nested
    everything = rc.region(row, 1.0, None)
    assert everything.mass == pytest.approx(1.0) and not everything.calibrated
    # every fine cell taken: each coarse cell with fine cells is named once, whole, instead of them
    coarse = pred.tables[0]["token"][rc.children[0] > 0]
    assert sorted(everything.tokens) == sorted(coarse) and len(everything.tokens) < len(row)
    assert everything.area_km2 >= rc.fine_area.sum()  # a whole coarse cell holds the places its fine cells leave out
    rows = locate(partitions_from_tables(pred.tables, pred.names), meta["lat"], meta["lon"])
    inside = rc.contains([everything.tokens] * len(meta), meta["lat"], meta["lon"])
    assert (inside == ((rows[:, 0] >= 0) & (rc.children[0][rows[:, 0]] > 0))).all()
    assert (rows[:, -1] < 0).any() and inside[rows[:, -1] < 0].any()  # some photos in no fine cell are held


def test_regions_grown_together_are_each_coverages_region_alone(fitted):
    pred, (_, emb) = fitted
    rc, cmap = pred.region_cells, pred.calibration["region"]
    levels = [0.3, 0.5, 0.8, 0.9, 0.99, 1.0]
    for row in pred.fine_probs(emb[:4]):
        together = rc.regions_at(row, levels, cmap)
        alone = [rc.regions_at(row, [c], cmap)[0] for c in levels]
        assert [(r.coverage, r.calibrated, r.mass, r.area_km2, r.tokens) for r in together] == \
            [(r.coverage, r.calibrated, r.mass, r.area_km2, r.tokens) for r in alone]
        assert len({len(r.tokens) for r in together}) > 1  # the levels are not all the same region


def test_every_answer_region_is_valid_geojson_with_a_positive_area(fitted):
    from shapely.geometry import Point, shape

    pred, (meta, emb) = fitted
    answers = pred.regions(pred.fine_probs(emb[:5]), 0.9)
    for a, la, lo in zip(answers, meta["lat"][:5], meta["lon"][:5]):
        assert a["coverage"] == 0.9 and a["calibrated"] and a["area_km2"] > 0 and 0 < a["mass"] <= 1
        geom = shape(a["geometry"])
        assert a["geometry"]["type"] == "MultiPolygon" and geom.is_valid and not geom.is_empty
        json.dumps(a)  # plain JSON
        assert [c["coverage"] for c in a["curve"]] == list(REPORT_COVERAGES)
        assert [c["area_km2"] for c in a["curve"]] == sorted(c["area_km2"] for c in a["curve"])
        inside = pred.region_cells.contains([a["cells"]], [la], [lo])[0]
        assert inside == geom.buffer(1e-6).contains(Point(lo, la)) or not inside  # cells and drawing agree


def test_a_batch_of_regions_is_what_each_row_gives_alone_and_a_repeated_region_is_drawn_once(fitted):
    pred, (_, emb) = fitted
    probs = pred.fine_probs(emb[:6])
    probs = np.concatenate([probs, probs[:2]])  # two photos again: the same regions
    cmap = pred.calibration["region"]
    batch = RegionCells(pred.tables, pred.names).answers(probs, 0.9, cmap)
    alone = [RegionCells(pred.tables, pred.names).answer(row, 0.9, cmap) for row in probs]
    assert json.dumps(batch) == json.dumps(alone)  # the same cells, areas, curves and drawing, to the digit
    assert batch[6]["geometry"] is batch[0]["geometry"]  # the union was made once


def test_a_region_is_drawn_as_the_union_of_its_cells(fitted):
    """The drawing is its cells merged: the shape of shapely's plain union of the cells' polygons (up to
    floating-point noding at the seams, 1e-12 of its area), valid, in no more pieces than cells, and wound as
    RFC 7946 says (exteriors counter-clockwise, holes clockwise)."""
    import shapely
    from shapely.geometry import shape

    pred, (_, emb) = fitted
    rc, cmap = RegionCells(pred.tables, pred.names), pred.calibration["region"]
    merged = 0
    for row in pred.fine_probs(emb[:8]):
        region = rc.regions_at(row, [0.9], cmap)[0]
        polygons = [rc._polygon(k, int(r)) for k, rows in enumerate(region.cells) for r in rows]
        drawn, plain = shape(rc.geometry(region)), shapely.unary_union(polygons)
        assert drawn.is_valid and drawn.symmetric_difference(plain).area <= 1e-12 * plain.area
        parts = shapely.get_parts(drawn)
        assert len(parts) <= len(polygons)
        assert all(p.exterior.is_ccw and not any(h.is_ccw for h in p.interiors) for p in parts)
        merged += len(parts) < len(polygons)
    assert merged  # some region had neighbouring cells to merge


def test_a_shape_becomes_the_geojson_shapely_mapping_gives_once_wound_counter_clockwise():
    from shapely.geometry import MultiPolygon, Polygon, mapping
    from shapely.geometry.polygon import orient

    from geo.stages.cells.region import _geojson_multipolygon

    clockwise = Polygon([(0, 0), (0, 4), (4, 4), (4, 0)], [[(1, 1), (2, 1), (2, 2), (1, 2)]])  # its hole turns ccw
    triangle = Polygon([(10, 0), (11, 0), (11, 1)])
    for shape in (clockwise, triangle, MultiPolygon([clockwise, triangle]), Polygon()):
        parts = [] if shape.is_empty else list(getattr(shape, "geoms", [shape]))
        assert _geojson_multipolygon(shape) == mapping(MultiPolygon([orient(p, 1.0) for p in parts]))


def test_semantic_cells_get_areas_and_shapes_from_s2_cells(tmp_path):
    from shapely.geometry import shape

    meta, emb = _world(500, seed=2)
    pred = fit_cells(meta, emb, CellsConfig(partitioner="semantic", tau_min=5, tau_max=[150, 40], max_epochs=5,
                                            crossfit=False), log=lambda *_: None)
    rc = RegionCells(pred.tables, pred.names)
    assert rc.semantic and (rc.fine_area > 0).all()
    for k, area in enumerate(rc.areas[:-1]):  # coarser semantic cells are unions of fine ones
        np.testing.assert_allclose(area, np.bincount(rc.parents[k], weights=rc.fine_area, minlength=len(area)))
    answer = rc.answer(pred.fine_probs(emb[:1])[0], 0.9, pred.calibration["region"])
    assert answer["area_km2"] > 0 and shape(answer["geometry"]).is_valid


def test_predictions_carry_duckdb_friendly_region_columns(fitted, tmp_path):
    from geo.eval.regions import mark_regions, region_table
    from geo.store.predictions import answers_to_frame, read_predictions, write_predictions

    pred, (meta, emb) = fitted
    regions = pred.regions(pred.fine_probs(emb[:40]), 0.9)
    answers = [Answer(image=f"q{i}", lat=la, lon=lo, mode="cells", confidence=0.5, region=r)
               for i, (la, lo, r) in enumerate(zip(meta["lat"], meta["lon"], regions))]
    answers.append(Answer.failed("bad.jpg", "unreadable"))
    frame = answers_to_frame(answers, truth=list(zip(meta["lat"][:40], meta["lon"][:40])) + [(0.0, 0.0)])
    mark_regions(type("Index", (), {"cells": pred})(), frame)
    write_predictions(tmp_path / "p.parquet", frame)
    back = read_predictions(tmp_path / "p.parquet")
    assert (back["region_coverage"][:40] == 0.9).all() and (back["region_area_km2"][:40] > 0).all()
    assert back["region_area_km2"].isna().iat[40] and back["region_hit"].isna().iat[40]
    table = region_table(back)
    assert [r["coverage"] for r in table] == list(REPORT_COVERAGES) and all(r["photos"] == 40 for r in table)
    assert table[2]["observed"] == back["region_hit"][:40].astype(bool).mean()

    from geo.store.geojson import feature_collection  # geo query --format geojson

    drawn = [f for f in feature_collection(back)["features"] if f["properties"]["role"] == "region"]
    assert len(drawn) == 40 and all(f["geometry"]["type"] == "MultiPolygon" for f in drawn)
    assert drawn[0]["properties"]["coverage"] == 0.9 and drawn[0]["properties"]["area_km2"] > 0

    from geo.eval.sql import run_sql  # geo sql: DuckDB over the predictions file

    got = run_sql("SELECT avg(region_hit::INT) AS hit, median(region_area_km2) AS area FROM predictions "
                  "WHERE region_coverage = 0.9", [tmp_path / "p.parquet"], None)
    assert got["hit"].iat[0] == pytest.approx(table[2]["observed"]) and got["area"].iat[0] > 0


def test_an_answers_dict_is_plain_json_data_the_caller_may_change():
    geometry = {"type": "MultiPolygon", "coordinates": [(((0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 0.0)),)]}
    a = Answer(image="q.jpg", lat=1.0, lon=2.0, confidence=float("nan"), neighbors=[{"id": "p", "similarity": 0.5}],
               region={"cells": ["89c"], "geometry": geometry}, p_within={"25": np.float32(0.25)})
    d = a.to_dict()
    assert "id" not in d and d["image"] == "q.jpg" and d["neighbors"] == a.neighbors and d["confidence"] is None
    assert d["region"]["geometry"]["coordinates"] == [[[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]]]
    assert type(d["p_within"]["25"]) is float and json.loads(json.dumps(d, allow_nan=False)) == d
    d["neighbors"][0]["id"] = "changed"
    d["region"]["cells"].append("x")
    assert a.neighbors[0]["id"] == "p" and a.region["cells"] == ["89c"]
    assert Answer(image=None, id="r").to_dict()["id"] == "r" and "image" not in Answer(image=None, id="r").to_dict()
