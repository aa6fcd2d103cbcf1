"""Support spots and the cells decision: mass kept per cell, the prior's answer under a flat posterior."""
import numpy as np
import pytest

from geo.core import s2
from geo.core.geodesy import pairwise_haversine_km
from geo.stages.cells import partition as P
from geo.stages.cells import support as S

CITIES = [(51.5, -0.1, 120), (48.9, 2.3, 90), (52.5, 13.4, 60), (40.7, -74.0, 100), (35.7, 139.7, 40)]


def _gallery(seed=0):
    """Photos around five cities of different sizes, spread over a few km to a few hundred km."""
    rng = np.random.default_rng(seed)
    lat = np.concatenate([rng.normal(la, 0.8, n) for la, _, n in CITIES])
    lon = np.concatenate([rng.normal(lo, 1.2, n) for _, lo, n in CITIES])
    return lat, lon


def _fine(lat, lon):
    part = P.build_partitions(lat, lon, 3, [40])[-1]
    rows = P.assign(s2.leaf_ids(lat, lon), part.cell_ids)
    table = P.cell_table(part, rows, lat, lon, {}, {})
    return rows, table


def test_spots_keep_every_cells_photos_and_respect_the_budget():
    lat, lon = _gallery()
    rows, table = _fine(lat, lon)
    full = S.support_points(lat, lon, rows, table)
    capped = S.support_points(lat, lon, rows, table, budget=2 * len(table))
    for spots in (full, capped):
        S.check_support(spots, len(table), "test")
        per_cell = spots.groupby("cell")["count"].sum().reindex(range(len(table)), fill_value=0).to_numpy()
        assert np.array_equal(per_cell, table["count"].to_numpy())
    assert capped.groupby("cell").size().max() <= 2 < full.groupby("cell").size().max()


def test_a_cell_without_photos_is_its_published_mean():
    lat, lon = _gallery()
    rows, table = _fine(lat, lon)
    rows = np.where(rows == 0, -1, rows)  # as if cell 0 came from an imported partition and holds no photo
    spots = S.support_points(lat, lon, rows, table)
    own = spots[spots["cell"] == 0]
    assert len(own) == 1 and own["count"].iat[0] == 1
    assert own[["lat", "lon"]].to_numpy()[0] == pytest.approx(table[["lat", "lon"]].to_numpy()[0])


def test_check_support_names_the_file_and_the_gap():
    lat, lon = _gallery()
    rows, table = _fine(lat, lon)
    spots = S.support_points(lat, lon, rows, table)
    with pytest.raises(ValueError, match="support.parquet: every fine cell"):
        S.check_support(spots[spots["cell"] != 1], len(table), "support.parquet")


def _prior_answer(lat, lon, rows, table):
    spots = S.support_points(lat, lon, rows, table)
    decision = S.SupportDecision(spots, table["lat"].to_numpy(), table["lon"].to_numpy())
    prior = table["count"].to_numpy(float) / table["count"].sum()
    a_lat, a_lon, mass = decision.decide(prior[None, :])
    inside = rows >= 0
    d_answer = pairwise_haversine_km(a_lat, a_lon, lat[inside], lon[inside])[0]
    d_spots = pairwise_haversine_km(spots["lat"], spots["lon"], lat[inside], lon[inside])
    return (a_lat[0], a_lon[0]), mass[0], d_answer, d_spots


def test_gallery_prior_posterior_answers_the_population_prior():
    """A posterior equal to the photo frequencies of the fine cells gives the spot covering most gallery photos
    within 750 km, and among those the one covering most within 200 km: the best constant guess."""
    lat, lon = _gallery()
    rows, table = _fine(lat, lon)
    (a_lat, a_lon), mass, d_answer, d_spots = _prior_answer(lat, lon, rows, table)
    cover750 = (d_spots <= 750).sum(1)
    assert len(d_spots) <= S.EXACT_SPOTS  # every spot is a candidate: the answer is exact
    assert (d_answer <= 750).sum() == cover750.max()
    assert mass == pytest.approx(cover750.max() / (rows >= 0).sum())
    assert (d_answer <= 200).sum() == (d_spots[cover750 == cover750.max()] <= 200).sum(1).max()
    assert 45 < a_lat < 55 and -5 < a_lon < 15  # among London, Paris and Berlin, not New York or Tokyo


def test_few_candidates_stay_near_the_best(monkeypatch):
    """Past EXACT_SPOTS spots, only those of the cells with most mass around their means are scored:
    near the exact answer while cells are small against the radius (they are huge here: 25 cells for 5 cities)."""
    monkeypatch.setattr(S, "EXACT_SPOTS", 64)
    monkeypatch.setattr(S, "MAX_CANDIDATES", 64)
    lat, lon = _gallery()
    rows, table = _fine(lat, lon)
    _, _, d_answer, d_spots = _prior_answer(lat, lon, rows, table)
    assert len(d_spots) > 64
    assert (d_answer <= 750).sum() >= 0.9 * (d_spots <= 750).sum(1).max()


def test_evidence_moves_the_answer_to_the_probable_cells():
    lat, lon = _gallery()
    rows, table = _fine(lat, lon)
    decision = S.SupportDecision(S.support_points(lat, lon, rows, table), table["lat"].to_numpy(), table["lon"].to_numpy())
    tokyo = (pairwise_haversine_km(table["lat"], table["lon"], [35.7], [139.7])[:, 0] < 500)
    post = np.where(tokyo, 0.9 / tokyo.sum(), 0.1 / (~tokyo).sum())
    a_lat, a_lon, mass = decision.decide(post[None, :])
    assert pairwise_haversine_km(a_lat, a_lon, [35.7], [139.7])[0, 0] < 300
    assert mass[0] == pytest.approx(0.9, abs=0.05)
