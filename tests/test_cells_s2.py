"""The vectorised S2 maths must agree with s2sphere bit for bit."""
import numpy as np
import pytest
import s2sphere

from geo.core import s2


def _points(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    lon = rng.uniform(-180, 180, n)
    # Poles, the antimeridian, face edges and corners.
    edge_lat = [90, -90, 0, 0, 0, 45, -45, 35.26438968, 0, 89.999999]
    edge_lon = [0, 0, 180, -180, 45, 45, -135, 45, 90, 123.4]
    return np.r_[edge_lat, lat], np.r_[edge_lon, lon]


def test_leaf_ids_match_s2sphere():
    lat, lon = _points()
    ours = s2.leaf_ids(lat, lon)
    ref = [s2sphere.CellId.from_lat_lng(s2sphere.LatLng.from_degrees(a, b)).id() for a, b in zip(lat, lon)]
    assert ours.dtype == np.uint64
    assert ours.tolist() == ref


@pytest.mark.parametrize("level", [0, 1, 5, 13, 22, 30])
def test_parents_levels_and_tokens_match_s2sphere(level):
    lat, lon = _points(500, seed=level)
    leaf = s2.leaf_ids(lat, lon)
    parents = s2.parent_ids(leaf, level)
    ref = [s2sphere.CellId(int(c)).parent(level) for c in leaf]
    assert s2.to_tokens(parents) == [c.to_token() for c in ref]
    assert (s2.levels_of(parents) == level).all()
    assert s2.from_tokens(s2.to_tokens(parents)).tolist() == parents.tolist()


def test_parent_of_a_cell_is_its_ancestor():
    leaf = s2.leaf_ids([48.85], [2.35])
    assert s2.parent_ids(s2.parent_ids(leaf, 12), 7).tolist() == s2.parent_ids(leaf, 7).tolist()


@pytest.mark.parametrize("bad", ["", "xyz", "0", "12345678901234567"])
def test_bad_tokens_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="not an S2 cell token"):
        s2.from_tokens([bad])
