"""Query-time constraints (--within COUNTRIES | box:S,W,N,E | near:LAT,LON,KM, --within-weight): parsing, every
answer and what it lists inside, the empty constraint, the soft weight between hard and none, CLI and HTTP."""
from __future__ import annotations

import json
from pathlib import Path

import faiss
import httpx
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from geo.cli import app
from geo.data.constraint import Constraint, ConstraintError, constraint_from_options
from geo.data.countries import country_index
from geo.query.client import locate_remote
from geo.query.index import open_index
from geo.stages.knn import KnnIndex
from geo.store.embeddings import EmbeddingReader
from geo.store.predictions import answers_to_frame, to_table
from serving import uvicorn_thread

# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize("text", ["PT", "pt", "PRT", "prt", "Portugal", " PORTUGAL ", "Portuguese Republic"])
def test_a_country_by_alpha2_alpha3_or_name_in_any_case(text):
    c = Constraint.countries(text)
    assert c.label() == "country:PRT" and c.hard
    assert c.contains([39.5, 40.4], [-8.0, -3.7]).tolist() == [True, False]  # central Portugal, Madrid


def test_several_countries_and_natural_earth_names():
    c = Constraint.countries("pt, ESP,Kosovo, Dem. Rep. Congo, PT")
    assert c.label() == "country:PRT,ESP,Kosovo,COD"  # repeated names counted once, order kept
    assert c.contains([40.4, 42.6, 48.9], [-3.7, 21.0, 2.35]).tolist() == [True, True, False]  # Madrid, Kosovo, Paris


def test_an_unknown_country_names_the_word_and_the_nearest_names():
    with pytest.raises(ConstraintError, match=r"unknown country 'Portgual' \(did you mean 'Portugal'"):
        Constraint.countries("Portgual")
    with pytest.raises(ConstraintError, match="unknown country 'XX'"):
        Constraint.countries("PT,XX")
    with pytest.raises(ConstraintError, match="no country"):
        Constraint.countries(" , ")


def test_a_box_and_one_across_the_antimeridian():
    c = Constraint.parse("box:36.9,-9.6,42.2,-6.2")
    assert c.label() == "box:36.9,-9.6,42.2,-6.2"
    assert c.contains([38.7, 38.7, 50.0, np.nan], [-9.1, -5.0, -9.1, -9.1]).tolist() == [True, False, False, False]
    fiji = Constraint.parse("BOX: -20, 175, -15, -178")  # west > east: across 180
    assert fiji.contains([-17.0, -17.0, -17.0], [178.0, -179.0, 0.0]).tolist() == [True, True, False]


@pytest.mark.parametrize("text, match", [("1,2,3", "4 numbers"), ("a,b,c,d", "4 numbers"),
                                         ("42,-9,36,-6", "south 42 must be below north 36"),
                                         ("36,-9,42,-9", "no width"), ("36,-190,42,-6", "longitude -190"),
                                         ("36,-9,95,-6", "latitude 95"), ("36,nan,42,-6", "4 numbers")])
def test_a_bad_box_says_what_is_wrong(text, match):
    with pytest.raises(ConstraintError, match=match):
        Constraint.parse("box:" + text)


def test_near_a_point_within_a_radius():
    c = Constraint.parse("near:45.76,4.84,50")  # Lyon
    assert c.label() == "near:45.76,4.84,50km"
    # 20 km away, Grenoble, Paris
    assert c.contains([45.9, 45.19, 48.86], [4.7, 5.72, 2.35]).tolist() == [True, False, False]
    for text, match in (("near:45.76,4.84", "LAT,LON,RADIUS_KM"), ("near:45.76,4.84,-5", "the radius must be"),
                        ("near:95,4.84,5", "latitude 95"), ("near:45.76,4.84,30000", "the radius must be")):
        with pytest.raises(ConstraintError, match=match):
            Constraint.parse(text)


def test_every_label_reads_back_and_the_options_combine():
    assert constraint_from_options() is None
    for c in (Constraint.parse("pt,es"), Constraint.parse("box:36.9,-9.6,42.2,-6.2"),
              Constraint.parse("near:45.123456,4.84,12.5km").weighted(0.25), Constraint.parse("Kosovo")):
        assert Constraint.parse(c.label()) == c and constraint_from_options(c.label()) == c
    assert constraint_from_options("PT", 0.3).label() == "country:PRT weight=0.3"
    for args, match in ((("box:3,2,1,4",), "south 3 must be below north 1"), ((None, 0.5), "needs a constraint"),
                        (("PT", 1.0), "above 0 and below 1"), (("PT", 0.0), "above 0 and below 1"),
                        (("PT", float("nan")), "above 0 and below 1"), (("planet:mars",), "unknown country")):
        with pytest.raises(ConstraintError, match=match):
            constraint_from_options(*args)


def test_country_membership_is_country_index_plus_its_coast():
    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(-90, 90, 20_000), rng.uniform(-180, 180, 20_000)
    idx = country_index(lat, lon)
    for text in ("US", "RU", "FJ", "NZ", "PT,ES,FR"):  # big rings, rings across 180, several countries
        c = Constraint.countries(text)
        got, shape = c.contains(lat, lon), np.isin(idx, c.shapes)
        assert (got[shape]).all() and (idx[got & ~shape] == -1).all(), text  # more only at sea
    pt = Constraint.countries("PT")  # Lisbon's waterfront is water at 1:50m; the mid-Atlantic is not Portugal
    assert pt.contains([38.70, 38.7, 42.0], [-9.14, -20.0, -8.0]).tolist() == [True, False, False]  # ..., Galicia


def test_an_ivf_index_searched_within_a_few_rows_still_finds_k_of_them():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(20_000, 32)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(32), 32, 128, faiss.METRIC_INNER_PRODUCT)
    ivf.train(emb)
    ivf.add(emb)
    ivf.nprobe = 8  # 8 of 128 lists would hold about one of 20 rows: the search widens with the share outside
    index = KnnIndex(ivf, pd.DataFrame({"id": np.arange(20_000).astype(str), "path": "", "lat": 0.0, "lon": 0.0}))
    rows = np.arange(0, 20_000, 1000)
    _, found = index.within(rows).search(emb[:5], 10)
    assert (found >= 0).all() and np.isin(found, rows).all()


# ---------------------------------------------------------------- answers from a bundle
@pytest.fixture(scope="module")
def built(cli_bundle):
    """(index, query embeddings: the gallery's own, perturbed so that none is a near-duplicate)."""
    index = open_index(cli_bundle[1], device="cpu")
    _, emb = EmbeddingReader(index.bundle).read()
    rng = np.random.default_rng(1)
    noisy = emb + rng.normal(0, 0.6 / np.sqrt(emb.shape[1]), emb.shape).astype(np.float32)
    return index, noisy / np.linalg.norm(noisy, axis=1, keepdims=True)


def _points(answers) -> np.ndarray:
    """Every point the answers give or list: the answers, alternatives, neighbours, gallery points, top cells."""
    pts = [(a.lat, a.lon) for a in answers]
    for a in answers:
        pts += [(p["lat"], p["lon"]) for f in ("alternatives", "neighbors", "gallery", "top_cells")
                for p in getattr(a, f)]
    return np.array(pts, np.float64)


def _inside_share(answers, c: Constraint) -> float:
    return float(c.contains([a.lat for a in answers], [a.lon for a in answers]).mean())


@pytest.mark.parametrize("constraint", [Constraint.parse("US,BR"), Constraint.parse("box:-60,-90,15,-30"),
                                        Constraint.parse("near:40,-100,2500")])
def test_every_answer_and_everything_listed_lies_inside_in_every_mode(built, constraint):
    index, emb = built
    for mode in [m for m in index.modes if m != "regression"]:
        plain = index.locate_embeddings(emb, mode=mode)
        answers = index.locate_embeddings(emb, mode=mode, within=constraint)
        pts = _points(answers)
        assert constraint.contains(pts[:, 0], pts[:, 1]).all(), mode
        assert all(a.within == constraint.label() and a.error is None for a in answers)
        assert _inside_share(plain, constraint) < 1, mode  # the constraint changed something
        assert all(len(a.neighbors) > 0 for a in answers)  # the search looked inside, not only the world's top k
    if "fused" in index.modes:
        assert any(a.alternatives for a in answers)


def test_cities_and_country_probability_follow_the_constraint(built):
    index, emb = built
    answers = index.locate_embeddings(emb, within=Constraint.countries("US"))
    assert {a.country.get("code") for a in answers} == {"840"}  # off its coast too: the lookup's coast rule
    assert all(c["city"].endswith(", US") for a in answers for c in a.cities)


def test_an_empty_constraint_is_a_clear_error(built, tmp_path):
    index, emb = built
    with pytest.raises(ValueError, match=r"no gallery photo inside country:ATA"):
        index.locate_embeddings(emb[:2], within=Constraint.countries("Antarctica"))
    with pytest.raises(ValueError, match="mode regression .* cannot be kept inside"):
        index.locate_embeddings(emb[:2], mode="regression", within=Constraint.countries("US"))


def test_a_soft_weight_lies_between_hard_and_none(built):
    index, emb = built
    c = Constraint.countries("US,BR,CN")
    none = _inside_share(index.locate_embeddings(emb), c)
    shares = [_inside_share(index.locate_embeddings(emb, within=c.weighted(w)), c) for w in (0.5, 1e-2, 1e-6)]
    assert none <= shares[0] <= shares[1] <= shares[2] <= 1.0
    assert none < shares[-1] and shares[0] < 1.0  # it leans inside, and a mild weight still answers outside
    soft = index.locate_embeddings(emb[:1], within=c.weighted(0.5))[0]
    assert soft.within == "country:USA,BRA,CHN weight=0.5"
    if [m for m in index.modes if m == "knn"] and not index.fusion.params.mode_fusion.get("knn"):
        with pytest.raises(ValueError, match="--within-weight reweights fusion's evidence"):
            index.locate_embeddings(emb[:1], mode="knn", within=c.weighted(0.5))


def test_within_is_a_predictions_column(built):
    index, emb = built
    answers = index.locate_embeddings(emb[:3], ids=["a", "b", "c"], within=Constraint.countries("US"))
    table = to_table(answers_to_frame(answers + index.locate_embeddings(emb[:1], ids=["d"])))
    assert table.schema.field("within").type == pa.string()  # a plain text column for DuckDB and geo sql
    assert table["within"].to_pylist() == ["country:USA"] * 3 + [None]


# ---------------------------------------------------------------- CLI and HTTP
@pytest.fixture(scope="module")
def query_table(built, tmp_path_factory):
    index, emb = built
    path = tmp_path_factory.mktemp("q") / "queries.parquet"
    pd.DataFrame({"id": [f"q{i}" for i in range(8)], "embedding": list(emb[:8])}).to_parquet(path)
    return path


def test_geo_query_within(cli_bundle, query_table):
    base = ["query", "--embeddings", str(query_table), "--index", str(cli_bundle[1]), "--json"]
    r = CliRunner().invoke(app, base + ["--within", "us,bra"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.output.splitlines()]
    c = Constraint.countries("US,BR")
    assert len(rows) == 8 and all(row["within"] == "country:USA,BRA" for row in rows)
    assert c.contains([row["lat"] for row in rows], [row["lon"] for row in rows]).all()
    r = CliRunner().invoke(app, base + ["--within", "Brasil"])
    assert r.exit_code == 2 and "unknown country 'Brasil' (did you mean 'Brazil'" in r.output
    r = CliRunner().invoke(app, base + ["--within", "near:40,-100"])
    assert r.exit_code == 2 and "LAT,LON,RADIUS_KM" in r.output
    r = CliRunner().invoke(app, base + ["--within-weight", "0.5"])
    assert r.exit_code == 2 and "--within-weight needs a constraint" in r.output


def test_http_locate_within(built):
    from geo.serve.app import create_app
    from geo.serve.limits import ServeLimits

    index, emb = built
    box = Constraint.parse("box:-60,-90,15,-30")
    with uvicorn_thread(create_app(index, ServeLimits())) as url:
        body = {"embeddings": emb[:4].tolist()}
        got = httpx.post(url + "/locate", params={"within": box.label()}, json=body, timeout=60)
        assert got.status_code == 200, got.text
        assert all(a["within"] == "box:-60,-90,15,-30" for a in got.json())
        assert box.contains([a["lat"] for a in got.json()], [a["lon"] for a in got.json()]).all()
        bad = httpx.post(url + "/locate", params={"within": "Atlantis"}, json=body, timeout=60)
        assert bad.status_code == 422 and "unknown country 'Atlantis'" in bad.json()["detail"]
        empty = httpx.post(url + "/locate", params={"within": "AQ"}, json=body, timeout=60)
        assert empty.status_code == 422 and "no gallery photo inside country:ATA" in empty.json()["detail"]
        soft = Constraint.parse("near:40,-100,2500").weighted(0.3)  # geo query --server sends the label
        photos = sorted(str(p) for p in (Path(index.knn.paths[0]).parent).glob("*.jpg"))[:2]
        remote = locate_remote(url, photos, within=soft)
        assert [a.within for a in remote] == ["near:40,-100,2500km weight=0.3"] * 2
        assert [(a.lat, a.lon) for a in remote] == [(a.lat, a.lon) for a in index.locate(photos, within=soft)]
