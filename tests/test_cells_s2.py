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


def _s2sphere_geometry(ids):
    cells = [s2sphere.Cell(s2sphere.CellId(int(c))) for c in ids]
    centres = [s2sphere.LatLng.from_point(c.get_center()) for c in cells]
    return ([c.lat().degrees for c in centres], [c.lng().degrees for c in centres], [c.exact_area() for c in cells])


@pytest.mark.parametrize("level", [0, 1, 2, 7, 13, 30])
def test_cell_centres_and_exact_areas_match_s2sphere(level):
    """Every level's cells, the edge points' included: equal, not close (the semantic raster and the regions'
    areas are computed here and were computed by s2sphere before)."""
    lat, lon = _points(400, seed=level)
    ids = s2.parent_ids(s2.leaf_ids(lat, lon), level)
    if level <= 7:  # and a spread of the level's cells in order
        ids = np.unique(np.r_[ids, s2.level_ids(level)[:: 4 ** level // 16 or 1]])
    ours = s2.cell_geometry(ids)
    assert [a.tolist() for a in ours] == [list(r) for r in _s2sphere_geometry(ids)]


def test_level_ids_are_every_cell_of_the_level_in_order():
    ids = s2.level_ids(3)
    assert len(ids) == 6 * 4 ** 3 and (np.diff(ids) > 0).all() and (s2.levels_of(ids) == 3).all()
    first = s2sphere.CellId.from_face_pos_level(0, 0, 3)
    assert s2.to_tokens(ids[[0, 1, -1]]) == [c.to_token() for c in (first, first.next(), s2sphere.CellId.end(3).prev())]


def test_cells_of_mixed_levels_get_their_own_geometry():
    lat, lon = _points(300, seed=7)
    leaf = s2.leaf_ids(lat, lon)
    levels = np.random.default_rng(7).integers(0, 31, len(leaf))
    ids = np.array([s2.parent_ids(leaf[k:k + 1], int(v))[0] for k, v in enumerate(levels)])
    assert [a.tolist() for a in s2.cell_geometry(ids)] == [list(r) for r in _s2sphere_geometry(ids)]


def test_cell_rings_match_s2sphere_corners_rounded_as_python_rounds():
    lat, lon = _points(300, seed=11)
    leaf = s2.leaf_ids(lat, lon)
    ids = np.r_[s2.parent_ids(leaf, 7), s2.parent_ids(leaf, 0), s2.parent_ids(leaf, 23)]
    rings = s2.cell_rings(ids)
    for c, ring in zip(ids, rings.tolist()):
        cell = s2sphere.Cell(s2sphere.CellId(int(c)))
        corners = [s2sphere.LatLng.from_point(cell.get_vertex(k)) for k in (0, 1, 2, 3, 0)]
        assert ring == [[round(p.lng().degrees, 6), round(p.lat().degrees, 6)] for p in corners]
    assert s2.cell_ring(s2.to_tokens(ids[:1])[0]) == tuple(tuple(p) for p in rings[0].tolist())
