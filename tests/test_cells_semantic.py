"""Semantic geocells (PIGEON): borders, density clusters, Voronoi assignment, nesting, storage, the stage."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from geo.core.geodesy import haversine_km, latlon_to_xyz
from geo.data.countries import country_index, country_names
from geo.stages.cells import partition as P
from geo.stages.cells.predictor import CellPredictor
from geo.stages.cells.semantic import semantic_cells
from geo.stages.cells.stage import CellsConfig, fit_cells, with_photos
from geo.store.bundle import Bundle, open_bundle

YFCC = Path(__file__).resolve().parents[2] / "shared" / "data" / "yfcc" / "yfcc25600_places365.csv"
# Twin towns a few km apart across a border: an S2 cell holding one holds the other.
TWINS = {"Strasbourg": (48.58, 7.75), "Kehl": (48.57, 7.83), "Geneva": (46.20, 6.14), "Annemasse": (46.19, 6.24),
         "El Paso": (31.80, -106.40), "Ciudad Juarez": (31.68, -106.45)}


def _twin_photos(per_town=40, seed=0):
    rng = np.random.default_rng(seed)
    town = np.repeat(np.arange(len(TWINS)), per_town)
    centre = np.array(list(TWINS.values()))[town]
    lat, lon = centre[:, 0] + rng.normal(0, 0.006, len(town)), centre[:, 1] + rng.normal(0, 0.006, len(town))
    return lat, lon


def _same_country_per_cell(rows, country):
    for r in np.unique(rows[rows >= 0]):
        assert len(np.unique(country[rows == r])) == 1, f"cell {r} straddles a border"


def test_cells_never_straddle_a_border_where_s2_cells_do():
    lat, lon = _twin_photos()
    country = country_index(lat, lon)
    names = country_names()
    assert {names[c] for c in np.unique(country)} == {"France", "Germany", "Switzerland", "United States of America",
                                                      "Mexico"}  # the fixture's premise
    parts = P.build_partitions(lat, lon, 5, [200, 100, 30], partitioner="semantic")
    rows = P.locate(parts, lat, lon)
    for k in range(len(parts)):
        _same_country_per_cell(rows[:, k], country)
    assert (rows >= 0).all()  # semantic cells cover the globe: no photo is left out
    adaptive = P.locate(P.build_partitions(lat, lon, 5, [200, 100, 30]), lat, lon)
    straddling = [len(np.unique(country[adaptive[:, 0] == r])) > 1 for r in np.unique(adaptive[:, 0])]
    assert any(straddling)  # the contrast the semantic partitioner exists for


def test_dense_clusters_become_cells_and_taus_hold():
    rng = np.random.default_rng(1)
    towns = [(45.76, 4.84), (43.30, 5.37), (48.86, 2.35), (47.22, -1.55)]  # Lyon, Marseille, Paris, Nantes
    lat = np.concatenate([rng.normal(a, 0.03, 60) for a, _ in towns])
    lon = np.concatenate([rng.normal(b, 0.03, 60) for _, b in towns])
    parts = P.build_partitions(lat, lon, 10, [240, 70], partitioner="semantic")
    rows = P.locate(parts, lat, lon)
    fine = rows[:, 1]
    counts = np.bincount(fine)
    assert counts.min() >= 10 and counts.max() <= 70
    town = np.repeat(np.arange(4), 60)
    for r in np.unique(fine):  # a fine cell is one town's photos, not a slice of two
        assert len(np.unique(town[fine == r])) == 1
    assert parts[0].n_cells == 1  # 240 photos fit one coarse cell: France is not split
    assert all(t.startswith("250-") for t in parts[1].tokens())  # ISO 3166 numeric 250: France


def test_partitions_nest_and_rebuild_from_their_tables():
    lat, lon = _twin_photos(per_town=80)
    parts = P.build_partitions(lat, lon, 5, [300, 100, 40], partitioner="semantic")
    parents = P.link_parents(parts)  # raises if a cell has no single parent
    rows = P.locate(parts, lat, lon)
    for k, fine in enumerate(parts):
        for j, coarse in enumerate(parts[:k]):
            assert (parents[fine.name][coarse.name][rows[:, k]] == rows[:, j]).all()
    by_name = {p.name: p for p in parts}
    tables = [P.cell_table(p, rows[:, k], lat, lon, parents[p.name], by_name) for k, p in enumerate(parts)]
    assert (tables[-1]["level"] == -1).all() and {"seed_lat", "seed_lon", "country"} <= set(tables[-1].columns)
    again = P.partitions_from_tables(tables, [p.name for p in parts])
    probe_lat = np.concatenate([lat, [48.0, 0.0, 46.5]])  # plus the Black Forest, the Gulf of Guinea, the Alps
    probe_lon = np.concatenate([lon, [8.2, 0.0, 7.0]])
    np.testing.assert_array_equal(P.locate(again, probe_lat, probe_lon), P.locate(parts, probe_lat, probe_lon))
    assert [t["token"].tolist() for t in tables] == [p.tokens() for p in again]


def test_points_outside_every_cell_country_take_the_nearest_seed():
    lat, lon = _twin_photos()
    (fine,) = P.build_partitions(lat, lon, 5, [30], partitioner="semantic")
    sem = fine.semantic
    # Luxembourg has no photos; the Atlantic has no country: each goes to the nearest seed of any country
    probe_lat, probe_lon = np.array([49.61, 30.0]), np.array([6.13, -60.0])
    got = P.locate([fine], probe_lat, probe_lon)[:, 0]
    d = haversine_km(probe_lat[:, None], probe_lon[:, None], sem.seed_lat[None, :], sem.seed_lon[None, :])
    np.testing.assert_array_equal(got, d.argmin(axis=1))
    # a point in France just south of Geneva, nearer Geneva's seed than Annemasse's, still takes a French one
    near_geneva = np.array([46.16]), np.array([6.15])
    assert country_names()[country_index(*near_geneva)[0]] == "France"
    d = haversine_km(near_geneva[0], near_geneva[1], sem.seed_lat, sem.seed_lon)
    assert country_names()[sem.country[d.argmin()]] == "Switzerland"
    row = P.locate([fine], *near_geneva)[0, 0]
    assert country_names()[sem.country[row]] == "France"


def test_coastal_photos_stay_with_their_country():
    rng = np.random.default_rng(2)
    # Nice: photos in town, and some from a boat 35 km out, beyond the 25 km the country lookup gives the coast
    lat, lon = rng.normal(43.69, 0.01, 60), rng.normal(7.27, 0.02, 60)
    lat = np.concatenate([lat, rng.normal(43.40, 0.005, 10)])
    lon = np.concatenate([lon, rng.normal(7.45, 0.005, 10)])
    assert (country_index(lat[60:], lon[60:]) < 0).all()  # the premise: these are "at sea" for the shapes
    cells = semantic_cells(lat, lon, 5, [100])
    assert cells[0].n_cells == 1 and cells[0].tokens() == ["250-0"]  # one French cell, no "sea" cell


def test_a_semantic_build_tests_each_photo_s_country_once(monkeypatch):
    from geo.data import countries

    tested, real = [], countries._country_index
    monkeypatch.setattr(countries, "_country_index", lambda lat, lon: tested.append(len(lat)) or real(lat, lon))
    lat, lon = _twin_photos(per_town=40)
    rng = np.random.default_rng(0)
    emb = (latlon_to_xyz(lat, lon) @ rng.normal(size=(3, 16))).astype(np.float32)
    meta = pd.DataFrame({"id": [f"p{i}" for i in range(len(lat))], "lat": lat, "lon": lon})
    config = CellsConfig(partitioner="semantic", tau_min=5, tau_max=[100, 30], max_epochs=2, crossfit=False,
                         answer_heads=False)
    fit_cells(meta.iloc[::2], emb[::2], config, log=lambda *_: None, photos=(lat, lon))  # heads on a sample
    assert tested == [len(lat)]  # the partitioner, the photos' cells and the sample's: one test of every photo


def test_the_sample_s_rows_read_from_the_gallery_s_equal_locating_it():
    from geo.stages.cells.stage import _rows_at

    lat, lon = _twin_photos()
    parts = P.build_partitions(lat, lon, 5, [100, 30], partitioner="semantic")
    probe_lat, probe_lon = np.concatenate([lat[::3], [48.0, 0.0]]), np.concatenate([lon[::3], [8.2, 0.0]])
    np.testing.assert_array_equal(_rows_at(parts, probe_lat, probe_lon, (lat, lon, P.locate(parts, lat, lon))),
                                  P.locate(parts, probe_lat, probe_lon))  # two probes are not gallery photos


def test_same_seed_same_cells():
    lat, lon = _twin_photos(per_town=60, seed=3)
    a = semantic_cells(lat, lon, 5, [200, 40], seed=0)
    b = semantic_cells(lat, lon, 5, [200, 40], seed=0)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.seed_lat, y.seed_lat)
        np.testing.assert_array_equal(x.group, y.group)


@pytest.mark.skipif(not YFCC.exists(), reason="../shared/data not present")
def test_real_yfcc_coordinates_respect_taus_and_borders():
    df = pd.read_csv(YFCC)
    lat, lon = df["LAT"].to_numpy(float), df["LON"].to_numpy(float)
    tau_min, tau_max = P.default_taus(len(lat))
    parts = P.build_partitions(lat, lon, tau_min, tau_max, partitioner="semantic")
    assert [p.n_cells for p in parts] == sorted(p.n_cells for p in parts)
    rows = P.locate(parts, lat, lon)
    P.link_parents(parts)
    country = country_index(lat, lon)
    for k, t_max in enumerate(tau_max):
        counts = np.bincount(rows[:, k])
        assert counts.min() >= tau_min
        assert np.mean(counts > t_max) < 0.01  # a cell over tau_max is one place photographed from one spot
    # a photo in a country with cells of its own is in one of them, at every level (the levels nest);
    # a country with fewer than tau_min photos has none, and its photos join the nearest cell abroad
    sem = parts[-1].semantic
    own = (country >= 0) & np.isin(country, sem.country)
    assert own.mean() > 0.8
    np.testing.assert_array_equal(sem.country[rows[own, -1]], country[own])


def test_the_stage_builds_saves_loads_and_adds_photos_with_semantic_cells(tmp_path):
    rng = np.random.default_rng(0)
    centres = np.array([(48.8, 2.3), (40.7, -74.0), (35.7, 139.7), (-33.9, 151.2), (-22.9, -43.2), (30.0, 31.2)])
    n, dim = 600, 16
    city = rng.integers(0, len(centres), n)
    lat, lon = centres[city, 0] + rng.normal(0, 0.3, n), centres[city, 1] + rng.normal(0, 0.3, n)
    emb = latlon_to_xyz(lat, lon) @ rng.normal(size=(3, dim)) * 3 + rng.normal(size=(n, dim))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    meta = pd.DataFrame({"id": [f"p{i}" for i in range(n)], "lat": lat, "lon": lon, "AUTHOR": [f"a{i % 40}" for i in range(n)]})
    bundle = Bundle.create_or_resume(tmp_path, {"name": "test"}, dim)
    fitted = fit_cells(meta, emb, CellsConfig(partitioner="semantic", tau_min=5, tau_max=[150, 40], max_epochs=10),
                       log=lambda *_: None)
    files, info = fitted.save(bundle)
    bundle.commit("cells", files, info, replace=("cells/", "heads/"))
    assert info["source"] == "semantic"
    pred = CellPredictor.load(open_bundle(tmp_path))
    fine = pred.fine_probs(emb[:20])
    top = pred.top_cells(fine[0], 3)
    assert top[0]["polygon"] is None and "-" in top[0]["token"]  # no S2 ring for a Voronoi cell
    a_lat, a_lon, _ = pred.decide(fine)
    assert (haversine_km(a_lat, a_lon, lat[:20], lon[:20]) < 200).mean() > 0.8
    # geo add: new photos land in the existing semantic cells; counts and means follow them
    more_lat, more_lon = np.full(30, 48.85), np.full(30, 2.35)
    grown = with_photos(pred, np.concatenate([lat, more_lat]), np.concatenate([lon, more_lon]))
    assert grown.tables[-1]["count"].sum() == n + 30
    assert grown.tables[0]["count"].sum() == n + 30
    paris = P.locate(P.partitions_from_tables(pred.tables, pred.names), [48.85], [2.35])[0, -1]
    assert grown.tables[-1]["count"].iat[paris] == pred.tables[-1]["count"].iat[paris] + 30


def test_build_index_with_semantic_cells_answers_queries_and_geo_add_keeps_them(tmp_path):
    from synthetic import synthetic_gallery, write_embeddings
    from typer.testing import CliRunner

    from geo.cli import app
    from geo.query.index import open_index

    def invoke(*args):
        return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)

    df = synthetic_gallery()
    src = write_embeddings(df.iloc[: len(df) - 40], tmp_path / "gallery.parquet")
    out = tmp_path / "bundle"
    r = invoke("build-index", "--embeddings", src, "--backbone", "toy24", "--group", "AUTHOR", "--out", out,
               "--partitioner", "semantic", "--skip", "gallery", "-q")
    assert r.exit_code == 0, r.output
    index = open_index(out)
    cells = index.bundle.manifest["stages"]["cells"]
    assert cells["source"] == "semantic"
    stored = np.stack(df["embedding"].iloc[:3])
    for mode in ("cells", "fused"):
        a = index.locate_embeddings(stored, mode=mode, ids=["a", "b", "c"])[0].to_dict()
        assert a["lat"] is not None and a["error"] is None
    answer = index.locate_embeddings(stored[:1], mode="cells", ids=["a"])[0].to_dict()
    assert answer["top_cells"][0]["polygon"] is None and answer["top_cells"][0]["token"].count("-") == 1
    more = write_embeddings(df.iloc[len(df) - 40:], tmp_path / "more.parquet")
    r = invoke("add", out, "--embeddings", more, "-q")
    assert r.exit_code == 0, r.output
    fine = pd.read_parquet(out / "cells" / f"{cells['partitions'][-1]}.parquet")
    assert fine["count"].sum() == len(df) and (fine["level"] == -1).all()


def test_an_unknown_partitioner_is_refused_by_name(tmp_path):
    from typer.testing import CliRunner

    from geo.cli import app

    r = CliRunner().invoke(app, ["build-index", "x.csv", "--out", str(tmp_path / "b"), "--partitioner", "voronoi"])
    assert r.exit_code == 2 and "--partitioner takes adaptive, bottomup, semantic, not 'voronoi'" in r.output
