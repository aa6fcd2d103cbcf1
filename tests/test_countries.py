"""Country labels (issue 14): the same shapes label truth and answer, offline, at sea and across the antimeridian."""
from __future__ import annotations

import numpy as np
import pytest

from geo.data.countries import countries_of, country_index
from geo.eval.metrics import label_accuracy
from geo.store.predictions import answers_to_frame


KNOWN = [
    (48.8566, 2.3522, "France"), (35.6895, 139.6917, "Japan"), (-15.7939, -47.8828, "Brazil"),
    (-35.2809, 149.1300, "Australia"), (-1.2921, 36.8219, "Kenya"), (38.9072, -77.0369, "United States of America"),
    (-29.6, 28.2, "Lesotho"),  # an enclave: inside South Africa's outer ring and inside its hole
    (66.0, 175.0, "Russia"), (65.0, -175.0, "Russia"),  # Chukotka, on both sides of the antimeridian
    (-16.8, -179.95, "Fiji"), (-17.8, 178.0, "Fiji"),
    (-80.0, 0.0, "Antarctica"),  # a ring round the pole
]


@pytest.mark.parametrize("lat,lon,name", KNOWN)
def test_known_places(lat, lon, name):
    assert countries_of([lat], [lon])[0]["name"] == name


@pytest.mark.parametrize("lat,lon", [(0.0, 0.0), (30.0, -40.0), (-40.0, -120.0), (52.0, -179.0)])
def test_a_point_at_sea_has_no_country(lat, lon):
    assert countries_of([lat], [lon]) == [None]


COASTAL = [  # places the 1:50m coastline leaves at sea: (lat, lon, name)
    (38.708, -9.136, "Portugal"),  # Lisbon
    (37.8037, -122.4368, "United States of America"),  # San Francisco's Marina
    (36.9741, -122.0308, "United States of America"),  # Santa Cruz, CA
    (36.5552, -121.9233, "United States of America"),  # Carmel
    (41.354, -71.966, "United States of America"),  # Mystic, coastal Connecticut
    (44.3876, -68.2039, "United States of America"),  # Bar Harbor, Maine
    (43.60, 7.25, "France"),  # off Nice, 10 km out
]


@pytest.mark.parametrize("lat,lon,name", COASTAL)
def test_a_coastal_place_the_shapes_cut_off_takes_the_nearest_country(lat, lon, name):
    assert countries_of([lat], [lon])[0]["name"] == name


def test_the_coast_reaches_25_km_out_and_no_further():
    # due west of Cabo da Roca (about -9.50): 24 km out is Portugal's, 29 km out is sea
    assert countries_of([38.7, 38.7], [-9.75, -9.80]) == [{"code": "620", "name": "Portugal"}, None]


def test_many_points_at_once_answer_as_one_at_a_time():
    # a few points are tested one by one, many through the tree: the enclave, both sides of the antimeridian,
    # the pole's ring, points on the antimeridian and on a shared border's box edge must agree
    rng = np.random.default_rng(0)
    edges = [(66.0, -180.0), (-16.5, 180.0), (47.0, 7.0), (0.0, 0.0)]
    lat = np.concatenate([[c[0] for c in COASTAL + KNOWN + edges], np.degrees(np.arcsin(rng.uniform(-1, 1, 300))),
                          [np.nan]])
    lon = np.concatenate([[c[1] for c in COASTAL + KNOWN + edges], rng.uniform(-180, 180, 300), [2.35]])
    together = country_index(lat, lon)
    assert together[-1] == -1 and (together >= 0).sum() > 80  # a missing coordinate has none; a third is land
    assert together.tolist() == [int(country_index([a], [b])[0]) for a, b in zip(lat, lon)]
    assert country_index([], []).tolist() == []


def test_codes_are_iso_numeric_and_many_points_at_once():
    out = countries_of(np.array([48.85, 0.0, 51.5]), np.array([2.35, 0.0, -0.12]))
    assert out[0] == {"code": "250", "name": "France"} and out[1] is None and out[2]["code"] == "826"


def test_predictions_carry_both_countries_and_accuracy_counts_land_only():
    answers = [{"image": "a", "lat": 48.85, "lon": 2.35, "error": None},  # right
               {"image": "b", "lat": 45.46, "lon": 9.19, "error": None},  # Milan for Lyon: wrong country
               {"image": "c", "lat": 10.0, "lon": 10.0, "error": None}]  # truth at sea: not counted
    df = answers_to_frame(answers, ["a", "b", "c"], [(48.86, 2.34), (45.76, 4.84), (0.0, -20.0)])
    assert df["true_country"].tolist() == ["France", "France", None]
    assert df["pred_country"].tolist() == ["France", "Italy", "Nigeria"]
    assert label_accuracy(df["true_country"], df["pred_country"]) == {"acc": 0.5, "n": 2}


def test_every_answer_names_its_country_with_the_cells_mass_on_it(cli_bundle):
    import pandas as pd

    from geo.query.index import open_index

    manifest, bundle = cli_bundle
    index = open_index(bundle)
    photo = pd.read_csv(manifest)["path"][3]
    for mode in index.modes:
        a = index.locate_one(photo, mode=mode)
        assert a.country["name"] == countries_of([a.lat], [a.lon])[0]["name"], mode
        assert 0.0 <= a.country["probability"] <= 1.0 and set(a.to_dict()["country"]) == {"code", "name", "probability"}


def test_city_labels_name_the_nearby_town_or_none():
    from geo.data.places import cities_of

    assert cities_of([48.8566, 45.76, 0.0], [2.3522, 4.84, -20.0]) == ["Paris, Ile-de-France, FR",
                                                                      "Lyon, Rhone-Alpes, FR", None]
    df = answers_to_frame([{"image": "a", "lat": 45.46, "lon": 9.19, "error": None}], ["a"], [(45.76, 4.84)])
    assert (df["true_city"][0], df["pred_city"][0]) == ("Lyon, Rhone-Alpes, FR", "Milano, Lombardy, IT")
    assert label_accuracy(df["true_city"], df["pred_city"]) == {"acc": 0.0, "n": 1}
