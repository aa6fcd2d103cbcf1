"""Country labels (issue 14): the same shapes label truth and answer, offline, at sea and across the antimeridian."""
from __future__ import annotations

import numpy as np
import pytest

from geo.data.countries import countries_of
from geo.eval.metrics import label_accuracy
from geo.store.predictions import answers_to_frame


@pytest.mark.parametrize("lat,lon,name", [
    (48.8566, 2.3522, "France"), (35.6895, 139.6917, "Japan"), (-15.7939, -47.8828, "Brazil"),
    (-35.2809, 149.1300, "Australia"), (-1.2921, 36.8219, "Kenya"), (38.9072, -77.0369, "United States of America"),
    (-29.6, 28.2, "Lesotho"),  # an enclave: inside South Africa's outer ring and inside its hole
    (66.0, 175.0, "Russia"), (65.0, -175.0, "Russia"),  # Chukotka, on both sides of the antimeridian
    (-16.8, -179.95, "Fiji"), (-17.8, 178.0, "Fiji"),
    (-80.0, 0.0, "Antarctica"),  # a ring round the pole
])
def test_known_places(lat, lon, name):
    assert countries_of([lat], [lon])[0]["name"] == name


@pytest.mark.parametrize("lat,lon", [(0.0, 0.0), (30.0, -40.0), (-40.0, -120.0), (52.0, -179.0)])
def test_a_point_at_sea_has_no_country(lat, lon):
    assert countries_of([lat], [lon]) == [None]


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
