"""S2 cell ids for whole arrays of coordinates at once.

s2sphere converts one point per Python call (~30 µs), which is hours for an
MP-16-sized gallery built at several levels. Here the lat/lng -> leaf id
conversion (quadratic projection, Hilbert curve through s2sphere's own 4-bit
lookup table) runs over numpy arrays, and every coarser cell is derived from
the leaf id with integer arithmetic, so a photo's cell id is computed once.
Cells' centres and exact areas (:func:`cell_geometry`) are s2sphere's operations
over arrays too: a semantic bundle's raster is the 98K cells of level 7.
Ids are uint64 (face 5 uses the top bit); tokens match ``CellId.to_token()``.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

import numpy as np
from s2sphere.sphere import LOOKUP_IJ, LOOKUP_POS

from geo.core.geodesy import latlon_to_xyz

MAX_LEVEL = 30
_MAX_SIZE = 1 << MAX_LEVEL
_U64 = np.uint64
_U_AXIS, _U_SIGN = np.array([1, 0, 0, 2, 2, 1]), np.array([1.0, -1, -1, 1, 1, -1])
_V_AXIS, _V_SIGN = np.array([2, 2, 1, 1, 0, 0]), np.array([1.0, 1, -1, 1, -1, -1])


_CHUNK = 1 << 16  # keeps the temporaries in cache: ~1.5x faster than whole-array passes


def leaf_ids(lat, lon) -> np.ndarray:
    """Leaf (level-30) cell ids, uint64 [n], for arrays of degrees."""
    lat = np.asarray(lat, dtype=np.float64).ravel()
    lon = np.asarray(lon, dtype=np.float64).ravel()
    if len(lat) != len(lon):
        raise ValueError(f"lat and lon differ in length ({len(lat)} vs {len(lon)})")
    out = np.empty(len(lat), dtype=np.uint64)
    for s in range(0, len(lat), _CHUNK):
        out[s:s + _CHUNK] = _leaf_ids(lat[s:s + _CHUNK], lon[s:s + _CHUNK])
    return out


def _leaf_ids(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    p = latlon_to_xyz(lat, lon)
    a = np.abs(p)
    # Same tie-breaking as s2sphere's Point.largest_abs_component.
    axis = np.where(a[:, 0] > a[:, 1], np.where(a[:, 0] > a[:, 2], 0, 2), np.where(a[:, 1] > a[:, 2], 1, 2))
    rows = np.arange(len(p))
    major = p[rows, axis]
    face = axis + 3 * (major < 0)
    # Per face, u and v are (sign * component) / major component, as in s2sphere's valid_face_xyz_to_uv.
    u = _U_SIGN[face] * p[rows, _U_AXIS[face]] / major
    v = _V_SIGN[face] * p[rows, _V_AXIS[face]] / major
    i = _st_to_ij(_uv_to_st(u))
    j = _st_to_ij(_uv_to_st(v))
    return _from_face_ij(face.astype(np.int64), i, j)


def _uv_to_st(u: np.ndarray) -> np.ndarray:
    return np.where(u >= 0, 0.5 * np.sqrt(1 + 3 * np.maximum(u, 0)), 1 - 0.5 * np.sqrt(1 - 3 * np.minimum(u, 0)))


def _st_to_ij(s: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(_MAX_SIZE * s), 0, _MAX_SIZE - 1).astype(np.int64)


def _byte_table() -> np.ndarray:
    """s2sphere's 4-bit Hilbert table applied twice: one lookup per 8 bits of i and j, 4 lookups per id."""
    four = np.asarray(LOOKUP_POS, dtype=np.int64)
    key = np.arange(1 << 18, dtype=np.int64)  # (i8 << 10) | (j8 << 2) | orientation
    i8, j8, orient = key >> 10, (key >> 2) & 0xFF, key & 3
    hi = four[(((i8 >> 4) << 6) | ((j8 >> 4) << 2)) | orient]
    lo = four[(((i8 & 0xF) << 6) | ((j8 & 0xF) << 2)) | (hi & 3)]
    return (((hi >> 2) << 8 | (lo >> 2)) << 2) | (lo & 3)


_LOOKUP8 = _byte_table()


def _from_face_ij(face: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """The Hilbert-curve position of leaf (i, j) on ``face``, 8 bits of i and j per table lookup.

    The position (60 bits) is built in int64, which numpy indexes and shifts
    faster than uint64; only the final id with the face on top needs uint64.
    """
    pos = np.zeros(len(face), dtype=np.int64)
    bits = face & 1  # initial orientation: swapped on odd faces
    for k in range(3, -1, -1):
        shift = 8 * k
        bits += (((i >> shift) & 0xFF) << 10) | (((j >> shift) & 0xFF) << 2)
        bits = _LOOKUP8[bits]
        pos |= (bits >> 2) << (2 * shift)
        bits &= 3
    return (face.astype(np.uint64) << _U64(2 * MAX_LEVEL + 1)) | (pos.astype(np.uint64) << _U64(1)) | _U64(1)


def lsb_for_level(level: int) -> np.uint64:
    return _U64(1 << (2 * (MAX_LEVEL - level)))


def parent_ids(ids: np.ndarray, level: int) -> np.ndarray:
    """Ancestor at ``level`` of every id (ids must be at ``level`` or finer)."""
    if not 0 <= level <= MAX_LEVEL:
        raise ValueError(f"S2 level must be in 0..30, got {level}")
    lsb = lsb_for_level(level)
    return (np.asarray(ids, dtype=np.uint64) & ~(lsb - _U64(1))) | lsb  # (id & -lsb) | lsb


def leaf_range(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last leaf id inside each cell: a cell is this contiguous range on the Hilbert curve."""
    ids = np.asarray(ids, dtype=np.uint64)
    half = (ids & (~ids + _U64(1))) - _U64(1)  # lowest set bit - 1
    return ids - half, ids + half


def levels_of(ids: np.ndarray) -> np.ndarray:
    """Level of every id, int8 [n], from the position of its lowest set bit."""
    ids = np.asarray(ids, dtype=np.uint64)
    low = ids & (~ids + _U64(1))  # isolate lowest set bit
    tz = np.log2(low.astype(np.float64)).round().astype(np.int64)  # exact: powers of two
    return (MAX_LEVEL - tz // 2).astype(np.int8)


def level_ids(level: int) -> np.ndarray:
    """Every cell id of one level, in id (Hilbert) order."""
    pos = np.arange(4 ** level, dtype=np.uint64)
    lsb = lsb_for_level(level)
    return np.concatenate([(_U64(f) << _U64(61)) | (pos * (lsb << _U64(1))) | lsb for f in range(6)])


_IJ = np.asarray(LOOKUP_IJ, dtype=np.int64)


def _face_ij(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(face, i, j) of every id, i and j at leaf resolution: s2sphere's ``to_face_ij_orientation`` for arrays
    (the leaf its bits name, inside the cell; ``i & -size`` is the cell's first row)."""
    ids = np.asarray(ids, dtype=np.uint64)
    face = (ids >> _U64(2 * MAX_LEVEL + 1)).astype(np.int64)
    pos = (ids & _U64((1 << (2 * MAX_LEVEL + 1)) - 1)).astype(np.int64)
    i, j, bits = np.zeros_like(pos), np.zeros_like(pos), face & 1
    for k in range(7, -1, -1):
        width = 2 if k == 7 else 4  # 30 bits of i and j: 2 then 7 lookups of 4
        bits = _IJ[bits + (((pos >> (8 * k + 1)) & ((1 << (2 * width)) - 1)) << 2)]
        i += (bits >> 6) << (4 * k)
        j += ((bits >> 2) & 15) << (4 * k)
        bits &= 3
    return face, i, j


def _st_to_uv(s: np.ndarray) -> np.ndarray:
    """s2sphere's quadratic projection, the same operations in the same order."""
    return np.where(s >= 0.5, (1.0 / 3.0) * (4 * s * s - 1), (1.0 / 3.0) * (1 - 4 * (1 - s) * (1 - s)))


def _unit_points(face: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """[n, 3] unit vectors of face coordinates: ``face_uv_to_xyz`` then ``Point.normalize``."""
    one = np.ones_like(u)
    x = np.choose(face, [one, -u, -u, -one, v, v])
    y = np.choose(face, [u, one, -v, -v, -one, u])
    z = np.choose(face, [v, v, one, -u, -u, -one])
    n = 1.0 / np.sqrt(x * x + y * y + z * z)  # never 0: one coordinate is +-1
    return np.stack([x * n, y * n, z * n], axis=-1)


def _libm(fn: Callable[..., float], *xs: np.ndarray) -> np.ndarray:
    """``fn`` from Python's ``math`` over same-shaped arrays, element by element. On a CPU with AVX-512, numpy's
    own arctan2, tan and arctan take SIMD paths that differ from the C library's (Python's ``math``, so
    s2sphere's) by an ulp in 0.2-5 % of values, and cells' centres and areas must be s2sphere's on every CPU."""
    return np.fromiter(map(fn, *(x.ravel().tolist() for x in xs)), np.float64, count=xs[0].size).reshape(xs[0].shape)


def _angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``Point.angle``: atan2 of the cross product's norm and the dot product."""
    cx = a[:, 1] * b[:, 2] - a[:, 2] * b[:, 1]
    cy = a[:, 2] * b[:, 0] - a[:, 0] * b[:, 2]
    cz = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    dot = a[:, 0] * b[:, 0] + a[:, 1] * b[:, 1] + a[:, 2] * b[:, 2]
    return _libm(math.atan2, np.sqrt(cx * cx + cy * cy + cz * cz), dot)


def _triangle_areas(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """s2sphere's ``area(a, b, c)`` by l'Huilier's formula, and [n] True where s2sphere would use Girard's
    instead (a long, thin triangle: no cell of level 2 or finer is one)."""
    sa, sb, sc = _angle(b, c), _angle(c, a), _angle(a, b)
    s = 0.5 * (sa + sb + sc)
    s2 = s * s
    girard = (s >= 3e-4) & (s - np.maximum(sa, np.maximum(sb, sc)) < 1e-2 * s * s2 * s2)
    t = (_libm(math.tan, 0.5 * s) * _libm(math.tan, 0.5 * (s - sa)) * _libm(math.tan, 0.5 * (s - sb))
         * _libm(math.tan, 0.5 * (s - sc)))
    return 4 * _libm(math.atan, np.sqrt(np.maximum(0.0, t))), girard


def _corners(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """(face, first leaf row i and column j, leaf rows per cell, the four corners [n, 3] in ``Cell.get_vertex``
    order) of every cell."""
    face, i, j = _face_ij(ids)
    size = np.left_shift(1, MAX_LEVEL - levels_of(ids).astype(np.int64))  # leaf rows and columns per cell
    lo_i, lo_j = i & -size, j & -size
    u = [_st_to_uv((1.0 / _MAX_SIZE) * lo_i), _st_to_uv((1.0 / _MAX_SIZE) * (lo_i + size))]
    v = [_st_to_uv((1.0 / _MAX_SIZE) * lo_j), _st_to_uv((1.0 / _MAX_SIZE) * (lo_j + size))]
    return face, lo_i, lo_j, size, [_unit_points(face, u[(k >> 1) ^ (k & 1)], v[k >> 1]) for k in range(4)]


def _degrees(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(latitudes, longitudes) in degrees of unit vectors [n, 3], as ``LatLng.from_point`` computes them."""
    lat = np.degrees(_libm(math.atan2, p[:, 2], np.sqrt(p[:, 0] * p[:, 0] + p[:, 1] * p[:, 1])))
    return lat, np.degrees(_libm(math.atan2, p[:, 1], p[:, 0]))


def cell_geometry(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centre latitudes, centre longitudes (degrees), exact areas (steradians)) of cells of any levels:
    s2sphere's ``Cell.get_center`` and ``Cell.exact_area``, the same floating-point operations in the same
    order, for whole arrays (equal to s2sphere's, tests). s2sphere took 14 s for the 98K cells of level 7."""
    ids = np.asarray(ids, dtype=np.uint64)
    face, lo_i, lo_j, size, corner = _corners(ids)
    lat, lon = _degrees(_unit_points(face, _st_to_uv((0.5 / _MAX_SIZE) * (2 * lo_i + size)),
                                     _st_to_uv((0.5 / _MAX_SIZE) * (2 * lo_j + size))))
    first, g1 = _triangle_areas(corner[0], corner[1], corner[2])
    second, g2 = _triangle_areas(corner[0], corner[2], corner[3])
    area = first + second
    for r in np.flatnonzero(g1 | g2):  # never for level 2 or finer: s2sphere's own Girard branch
        area[r] = _s2sphere_area(int(ids[r]))
    return lat, lon, area


def cell_rings(ids: np.ndarray) -> np.ndarray:
    """[n, 5, 2] closed GeoJSON rings of (lon, lat) degrees, counter-clockwise (RFC 7946), rounded to 6
    decimals as Python rounds: :func:`cell_ring` for whole arrays (a semantic cell is drawn from thousands)."""
    ids = np.asarray(ids, dtype=np.uint64)
    out = np.empty((len(ids), 5, 2))
    for k, p in enumerate(_corners(ids)[4]):
        lat, lon = _degrees(p)
        out[:, k, 0] = [round(x, 6) for x in lon.tolist()]
        out[:, k, 1] = [round(x, 6) for x in lat.tolist()]
    out[:, 4] = out[:, 0]
    return out


def _s2sphere_area(cell_id: int) -> float:
    import s2sphere  # the rare cell whose triangles take Girard's formula

    return s2sphere.Cell(s2sphere.CellId(cell_id)).exact_area()


def to_tokens(ids: np.ndarray) -> list[str]:
    """Tokens (hex without trailing zeros), identical to ``s2sphere.CellId.to_token()``."""
    return [format(int(c), "016x").rstrip("0") or "X" for c in np.asarray(ids, dtype=np.uint64)]


def from_tokens(tokens) -> np.ndarray:
    """uint64 ids from tokens; a token that is not an S2 token raises ValueError naming it."""
    out = np.empty(len(tokens), dtype=np.uint64)
    for k, t in enumerate(tokens):
        t = str(t).strip().lower()
        if not 0 < len(t) <= 16 or any(ch not in "0123456789abcdef" for ch in t) or int(t, 16) == 0:
            raise ValueError(f"not an S2 cell token: {t!r}")
        out[k] = int(t.ljust(16, "0"), 16)
    return out


@lru_cache(maxsize=1 << 16)
def cell_ring(token: str) -> tuple[tuple[float, float], ...]:
    """A cell's boundary as a closed GeoJSON ring of (lon, lat) (counter-clockwise, RFC 7946), for maps.

    S2 edges are great-circle arcs, so the four corners describe the cell exactly
    for a spherical renderer (d3-geo); planar GIS tools draw straight edges. Memoised (and so immutable):
    s2sphere takes 0.1 ms a cell, and answers list the popular cells, and regions draw them, again and again.
    One cell through s2sphere, not :func:`cell_rings` (equal, tests): numpy's call overheads make one ring 1 ms.
    """
    import s2sphere  # one cell at a time, for the cells answers list and regions draw

    cell = s2sphere.Cell(s2sphere.CellId.from_token(token))
    ring = []
    for k in range(4):
        ll = s2sphere.LatLng.from_point(cell.get_vertex(k))
        ring.append((round(ll.lng().degrees, 6), round(ll.lat().degrees, 6)))
    return (*ring, ring[0])
