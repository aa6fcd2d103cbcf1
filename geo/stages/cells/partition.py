"""Partitions of the gallery into cells, and the cell tables the heads classify into.

A partition is a set of disjoint S2 cells (any mix of levels), or semantic
cells (:mod:`geo.stages.cells.semantic`: country borders and Voronoi regions
around where photos cluster). Several
partitions share one ``tau_min`` and are ordered coarse -> fine, so every
cell of a finer partition lies inside exactly one cell of each coarser one;
the hierarchical prediction (f*) relies on that and :func:`link_parents`
refuses partitions that break it.

Two partitioners make such cells:

* ``adaptive`` (PlaNet, Müller-Budack et al. 2018): top-down, split a cell
  while it holds more than ``tau_max`` photos, drop cells with fewer than
  ``tau_min``.
* ``bottomup`` (seed 002): every S2 cell holding between ``tau_min`` and
  ``tau_max`` photos is a candidate hot spot; candidates are claimed greedily
  in order of the within-cell sum of squares of their image features (per
  photo: the most visually coherent places first, because a classifier can
  learn those), skipping any that overlaps a claimed one.

* ``semantic`` (PIGEON): see :mod:`geo.stages.cells.semantic`.

For S2 partitions, photos are handled as leaf ids computed once; every
coarser cell is integer arithmetic on them (:mod:`geo.core.s2`). Whatever the
kind, :func:`locate` gives each coordinate its row in every partition, and
:func:`partitions_from_tables` rebuilds the partitions from a bundle's cell tables.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from geo.core import s2
from geo.core.geodesy import latlon_to_xyz, xyz_to_latlon
from geo.core.tables import positions
from geo.stages.cells.semantic import SemanticCells, semantic_cells

if TYPE_CHECKING:
    import pandas as pd

PARTITIONERS = ("adaptive", "bottomup", "semantic")
SEMANTIC_COLUMNS = ["seed_lat", "seed_lon", "country"]  # the finest semantic table's: its cells' Voronoi seeds
# MP-16 (Müller-Budack et al. 2018): 4.72 M photos -> tau_min 50, tau_max 5000 / 2000 / 1000.
MP16_PHOTOS = 4_723_695
MP16_TAU_MIN = 50
MP16_TAU_MAX = (5000, 2000, 1000)
GEOESTIMATION_COLUMNS = ["class_label", "hex_id", "imgs_per_cell", "latitude_mean", "longitude_mean"]


@dataclass
class Partition:
    """One partition: its name and its disjoint cells (row order = class label): S2 cells (uint64 ids in
    ``cell_ids``) or, with ``semantic`` set, semantic cells (``cell_ids`` empty)."""

    name: str
    cell_ids: np.ndarray
    # Class2GPS points for cells that may hold no gallery photo (imported partitions).
    fallback_lat: np.ndarray | None = None
    fallback_lon: np.ndarray | None = None
    semantic: SemanticCells | None = None

    @property
    def n_cells(self) -> int:
        return self.semantic.n_cells if self.semantic is not None else len(self.cell_ids)

    def tokens(self) -> list[str]:
        return self.semantic.tokens() if self.semantic is not None else s2.to_tokens(self.cell_ids)

    def levels(self) -> np.ndarray:
        """S2 level per cell; -1 for semantic cells, which have none."""
        return np.full(self.n_cells, -1, np.int64) if self.semantic is not None else s2.levels_of(self.cell_ids)


def default_names(k: int) -> list[str]:
    return {1: ["fine"], 2: ["coarse", "fine"], 3: ["coarse", "middle", "fine"]}.get(k, [f"p{i}" for i in range(k)])


def default_taus(n_photos: int) -> tuple[int, list[int]]:
    """MP-16's thresholds scaled by sqrt(gallery size / MP-16 size).

    Linear scaling would leave a few-thousand-photo gallery with tau_max
    below tau_min; square-root scaling keeps MP-16's exact values at its own
    size, grows the number of cells like sqrt(n) and keeps at least 2
    examples per class.
    """
    s = np.sqrt(max(n_photos, 1) / MP16_PHOTOS)
    tau_min = max(2, round(MP16_TAU_MIN * s))
    tau_max, floor = [], 2 * tau_min
    for t in sorted(MP16_TAU_MAX):  # finest first, so each coarser one is strictly larger
        floor = max(floor, round(t * s))
        tau_max.append(floor)
        floor += 1
    return tau_min, sorted(tau_max, reverse=True)


# ------------------------------------------------------------ assignment
def assign(ids: np.ndarray, cell_ids: np.ndarray) -> np.ndarray:
    """Row of the cell containing each id (leaf ids or whole cells), -1 where none; int64 [n].

    A cell is the interval of leaf ids [id - (lsb - 1), id + (lsb - 1)]; the
    cells of a partition are disjoint intervals, so one binary search per
    point finds the only candidate, whatever mix of levels the partition has.
    """
    ids = np.asarray(ids, dtype=np.uint64)
    cell_ids = np.asarray(cell_ids, dtype=np.uint64)
    out = np.full(len(ids), -1, dtype=np.int64)
    if not len(cell_ids) or not len(ids):
        return out
    c_lo, c_hi = s2.leaf_range(cell_ids)
    order = np.argsort(c_lo)
    c_lo, c_hi = c_lo[order], c_hi[order]
    if (c_lo[1:] <= c_hi[:-1]).any():
        raise ValueError("cells of one partition overlap (one contains another); a partition must be disjoint")
    lo, hi = s2.leaf_range(ids)
    pos = np.searchsorted(c_lo, lo, side="right") - 1
    cand = np.maximum(pos, 0)
    hit = (pos >= 0) & (hi <= c_hi[cand])
    out[hit] = order[cand[hit]]
    return out


# ------------------------------------------------------------ partitioners
def adaptive_cells(leaf: np.ndarray, tau_min: int, tau_max: int, min_level: int = 2, max_level: int = 30) -> np.ndarray:
    """PlaNet's adaptive cells: sorted uint64 ids.

    Only photos still in an over-full cell go down a level, so the work
    shrinks level by level. A cell at ``max_level`` is kept even when over
    ``tau_max`` (identical coordinates cannot be split further).
    """
    _check_taus(tau_min, [tau_max])
    active = np.asarray(leaf, dtype=np.uint64)
    kept_ids, kept_counts = [], []
    for level in range(min_level, max_level + 1):
        cid = s2.parent_ids(active, level)
        uniq, inv, counts = np.unique(cid, return_inverse=True, return_counts=True)
        done = (counts <= tau_max) | (level == max_level)
        kept_ids.append(uniq[done])
        kept_counts.append(counts[done])
        active = active[~done[inv]]
        if not len(active):
            break
    ids = np.concatenate(kept_ids)
    return np.sort(ids[np.concatenate(kept_counts) >= tau_min])


def bottomup_cells(leaf: np.ndarray, emb: np.ndarray, tau_min: int, tau_max: int, min_level: int = 2,
                   max_level: int = 30, finer: np.ndarray | None = None, finer_tau_max: int = 0) -> np.ndarray:
    """Seed 002's bottom-up cells: sorted uint64 ids (see the module docstring).

    ``finer``: the cells of the next finer partition; candidates strictly
    inside one of them are excluded so the finer cells nest in these.
    Candidates holding more than ``finer_tau_max`` photos are claimed first,
    so a coarser partition is not a copy of the finer one where photos are dense.
    """
    _check_taus(tau_min, [tau_max])
    leaf = np.asarray(leaf, dtype=np.uint64)
    emb = np.asarray(emb, dtype=np.float32)
    if len(emb) != len(leaf):
        raise ValueError(f"bottomup partitioner: {len(emb)} embeddings for {len(leaf)} photos")
    order = np.argsort(leaf, kind="stable")  # Hilbert order: every cell's photos are one contiguous run
    leaf, emb = leaf[order], emb[order]
    sq_norm = (emb.astype(np.float64) ** 2).sum(1)
    cand, cost, size = [], [], []
    for level in range(min_level, max_level + 1):
        uniq, start, counts = np.unique(s2.parent_ids(leaf, level), return_index=True, return_counts=True)
        ok = (counts >= tau_min) & (counts <= tau_max)
        if ok.any():
            sums = np.add.reduceat(emb, start, axis=0, dtype=np.float64)[ok]
            n = counts[ok]
            wcss = np.add.reduceat(sq_norm, start)[ok] - (sums**2).sum(1) / n
            cand.append(uniq[ok])
            cost.append(wcss / (n - 1))  # unbiased: WCSS / n would favour the smallest cells
            size.append(n)
        if counts.max() < tau_min:
            break
    if not cand:
        return np.empty(0, dtype=np.uint64)
    cand, cost, size = np.concatenate(cand), np.concatenate(cost), np.concatenate(size)
    if finer is not None and len(finer):
        inside = assign(cand, finer)
        cand_levels, fine_levels = s2.levels_of(cand), s2.levels_of(np.asarray(finer, dtype=np.uint64))
        strict = (inside >= 0) & (cand_levels > fine_levels[np.maximum(inside, 0)])
        cand, cost, size = cand[~strict], cost[~strict], size[~strict]
    levels = s2.levels_of(cand)
    # ancestors[r, a] = ancestor of candidate r at level a (the candidate itself at and below its own level).
    ancestors = np.stack([np.where(levels > a, s2.parent_ids(cand, a), cand) for a in range(min_level, max_level)], 1)
    claimed: set[int] = set()
    holds_claim: set[int] = set()  # cells with a claimed descendant
    for r in np.lexsort((-size, cost, size <= finer_tau_max)).tolist():
        c = int(cand[r])
        up = set(ancestors[r, : int(levels[r]) - min_level].tolist())
        if c in holds_claim or not claimed.isdisjoint(up):
            continue
        claimed.add(c)
        holds_claim |= up
    return np.sort(np.fromiter(claimed, dtype=np.uint64, count=len(claimed)))


def _check_taus(tau_min: int, tau_max: list[int]) -> None:
    if tau_min < 1:
        raise ValueError(f"tau_min must be >= 1, got {tau_min}")
    for t in tau_max:
        if t < tau_min:
            raise ValueError(f"tau_max {t} is below tau_min {tau_min}")


def build_partitions(lat: np.ndarray, lon: np.ndarray, tau_min: int, tau_max: list[int],
                     partitioner: str = "adaptive", emb: np.ndarray | None = None, names: list[str] | None = None,
                     min_level: int = 2, max_level: int = 30, seed: int = 0,
                     country: np.ndarray | None = None) -> list[Partition]:
    """Partitions coarse -> fine (``tau_max`` sorted descending), nested by construction. ``country``: the
    photos' :func:`geo.data.countries.country_index`, when the caller has it (semantic cells need it)."""
    if partitioner not in PARTITIONERS:
        raise ValueError(f"unknown partitioner {partitioner!r}; choose one of {', '.join(PARTITIONERS)}")
    if partitioner == "bottomup" and emb is None:
        raise ValueError("the bottomup partitioner ranks cells by image features: pass the embeddings")
    tau_max = sorted({int(t) for t in tau_max}, reverse=True)
    _check_taus(tau_min, tau_max)
    names = names or default_names(len(tau_max))
    if len(names) != len(tau_max):
        raise ValueError(f"{len(names)} partition names for {len(tau_max)} tau_max values")
    if partitioner == "semantic":
        return [Partition(n, np.empty(0, np.uint64), semantic=c)
                for n, c in zip(names, semantic_cells(lat, lon, tau_min, tau_max, seed, country))]
    leaf = s2.leaf_ids(lat, lon)
    if partitioner == "adaptive":
        cells = [adaptive_cells(leaf, tau_min, t, min_level, max_level) for t in tau_max]
    else:  # finest first: each coarser partition may only take unions of finer cells
        cells, finer, finer_t = [], None, 0
        for t in reversed(tau_max):
            finer = bottomup_cells(leaf, emb, tau_min, t, min_level, max_level, finer, finer_t)
            finer_t = t
            cells.insert(0, finer)
    return [Partition(n, c) for n, c in zip(names, cells)]


def locate(partitions: list[Partition], lat, lon, country: np.ndarray | None = None) -> np.ndarray:
    """Each coordinate's row in every partition, int64 [n, partitions], -1 where it lies in none.

    S2 partitions look up the leaf id (computed once); semantic ones the nearest seed (found once, for the
    seeds are the same in every partition of a build), from ``country`` (the points'
    :func:`geo.data.countries.country_index`) when the caller has it."""
    lat, lon = np.asarray(lat, np.float64).ravel(), np.asarray(lon, np.float64).ravel()
    leaf = seeds = None
    out = np.empty((len(lat), len(partitions)), np.int64)
    for k, p in enumerate(partitions):
        if p.semantic is not None:
            seeds = p.semantic.seed_rows(lat, lon, country) if seeds is None else seeds
            out[:, k] = p.semantic.rows(lat, lon, seeds)
        else:
            leaf = s2.leaf_ids(lat, lon) if leaf is None else leaf
            out[:, k] = assign(leaf, p.cell_ids)
    return out


def _parent_rows(fine: Partition, coarse: Partition) -> np.ndarray:
    """Row in ``coarse`` of each cell of ``fine`` (-1: none, or the cell straddles several)."""
    if fine.semantic is None and coarse.semantic is None:
        return assign(fine.cell_ids, coarse.cell_ids)
    if fine.semantic is None or coarse.semantic is None or not np.array_equal(fine.semantic.seed_lat, coarse.semantic.seed_lat):
        return np.full(fine.n_cells, -1, np.int64)  # different kinds of cells do not nest
    f, c = fine.semantic.group, coarse.semantic.group
    rows = np.full(fine.n_cells, -1, np.int64)
    rows[f] = c
    straddles = np.zeros(fine.n_cells, bool)
    straddles[f[rows[f] != c]] = True  # a fine cell whose seeds lie in two coarse cells
    rows[straddles] = -1
    return rows


def link_parents(partitions: list[Partition]) -> dict[str, dict[str, np.ndarray]]:
    """For each partition, the row of its cell's ancestor in every coarser partition.

    Raises ValueError naming the partitions when a cell has no parent there:
    f* multiplies by the parent's probability, so an orphan cell cannot be scored.
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    for k, fine in enumerate(partitions):
        out[fine.name] = {}
        for coarse in partitions[:k]:
            rows = _parent_rows(fine, coarse)
            if (rows < 0).any():
                bad = np.asarray(fine.tokens(), dtype=object)[rows < 0][:5]
                raise ValueError(
                    f"partition {fine.name!r}: {(rows < 0).sum()} cells (e.g. {', '.join(bad)}) lie in no cell of "
                    f"the coarser partition {coarse.name!r}; the partitions must nest (same tau_min, ordered coarse->fine)"
                )
            out[fine.name][coarse.name] = rows
    return out


def cell_table(part: Partition, rows: np.ndarray, lat: np.ndarray, lon: np.ndarray,
               parents: dict[str, np.ndarray], coarser: dict[str, Partition]) -> pd.DataFrame:
    """The cell table of one partition; ``rows`` is each photo's cell row (-1: none).

    lat/lon are the spherical mean of the cell's photos (Class2GPS): where
    the photos are, not the cell centre, and safe across the antimeridian.
    """
    import pandas as pd  # the build's: a query reads the tables as numpy columns

    n_cells = part.n_cells
    inside = rows >= 0
    counts = np.bincount(rows[inside], minlength=n_cells)
    xyz = latlon_to_xyz(lat[inside], lon[inside])
    sums = np.stack([np.bincount(rows[inside], weights=xyz[:, a], minlength=n_cells) for a in range(3)], 1)
    mean_lat, mean_lon = xyz_to_latlon(sums)
    empty = counts == 0
    if empty.any():
        if part.fallback_lat is None:
            raise ValueError(f"partition {part.name!r}: {empty.sum()} cells hold no photo and have no published mean")
        mean_lat[empty], mean_lon[empty] = part.fallback_lat[empty], part.fallback_lon[empty]
    table = pd.DataFrame({
        "class_label": np.arange(n_cells, dtype=np.int32),
        "token": part.tokens(),
        "level": part.levels(),
        "count": counts.astype(np.int64),
        "lat": mean_lat,
        "lon": mean_lon,
    })
    sem = part.semantic
    if sem is not None and sem.n_cells == len(sem.group):  # the finest: one row per seed, in seed order
        table["seed_lat"], table["seed_lon"], table["country"] = sem.seed_lat, sem.seed_lon, sem.country
    for name, prow in parents.items():
        table[f"parent_{name}"] = np.asarray(coarser[name].tokens(), dtype=object)[prow]
    return table


def partitions_from_tables(tables: list[Any], names: list[str]) -> list[Partition]:
    """The partitions a bundle's cell tables (coarse -> fine; DataFrames or numpy columns, :mod:`geo.core.tables`)
    describe: what ``geo add`` assigns new photos with.

    S2 tables name their cells by token; semantic ones keep the seeds in the finest table and each coarser
    partition as the finest table's ``parent_<name>`` column."""
    fine = tables[-1]
    if not set(SEMANTIC_COLUMNS) <= set(fine):
        return [Partition(n, s2.from_tokens(np.asarray(t["token"]).tolist())) for n, t in zip(names, tables)]
    seed_lat, seed_lon = np.asarray(fine["seed_lat"], np.float64), np.asarray(fine["seed_lon"], np.float64)
    country = np.asarray(fine["country"], np.int64)
    parts = []
    for n, t in zip(names[:-1], tables[:-1]):
        group = positions(t["token"], fine[f"parent_{n}"])
        if (group < 0).any():
            raise ValueError(f"cell table {n!r}: the finest table names parents it does not hold")
        parts.append(Partition(n, np.empty(0, np.uint64), semantic=SemanticCells(seed_lat, seed_lon, country, group)))
    return parts + [Partition(names[-1], np.empty(0, np.uint64),
                              semantic=SemanticCells(seed_lat, seed_lon, country, np.arange(len(seed_lat))))]


# ------------------------------------------------------------ published partitions
def read_geoestimation_csv(path: str | Path) -> Partition:
    """A GeoEstimation cell file (two comment lines, then ``class_label,hex_id,imgs_per_cell,...``).

    ``hex_id`` is read as a string: tokens such as ``8747c`` or ``0f`` are not numbers.
    Rows keep the file's class labels.
    """
    import pandas as pd  # the build's: a query never reads a published partition

    path = Path(path)
    try:
        df = pd.read_csv(path, skiprows=2, dtype={"hex_id": str})
    except FileNotFoundError:
        raise ValueError(f"{path}: no such cell file") from None
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise ValueError(f"{path}: not a GeoEstimation cell CSV ({e})") from None
    missing = [c for c in GEOESTIMATION_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; expected two comment lines then {','.join(GEOESTIMATION_COLUMNS)}")
    df = df.sort_values("class_label")
    if not np.array_equal(df["class_label"].to_numpy(), np.arange(len(df))):
        raise ValueError(f"{path}: class_label must run 0..{len(df) - 1} without gaps")
    try:
        ids = s2.from_tokens(df["hex_id"].tolist())
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate hex_id tokens")
    return Partition(path.stem, ids, df["latitude_mean"].to_numpy(float), df["longitude_mean"].to_numpy(float))


def read_partitions(paths: list[str | Path]) -> list[Partition]:
    """Several published partitions, ordered coarse -> fine by their number of cells and named like built ones."""
    parts = sorted((read_geoestimation_csv(p) for p in paths), key=lambda p: len(p.cell_ids))
    for part, name in zip(parts, default_names(len(parts))):
        part.name = name
    return parts
