"""Partitions on the 25,600 real YFCC26k coordinates, and the published MP-16 partitions."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from geo.core import s2
from geo.stages.cells import partition as P

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
YFCC = DATA / "yfcc" / "yfcc25600_places365.csv"
CELLS = DATA / "geoestimation" / "geo-cells"
pytestmark = pytest.mark.skipif(not YFCC.exists(), reason="../shared/data not present")


@pytest.fixture(scope="module")
def yfcc():
    df = pd.read_csv(YFCC)
    return df["LAT"].to_numpy(float), df["LON"].to_numpy(float)


def _check(parts, lat, lon, tau_min, tau_max):
    leaf = s2.leaf_ids(lat, lon)
    for part, t_max in zip(parts, tau_max):
        rows = P.assign(leaf, part.cell_ids)
        counts = np.bincount(rows[rows >= 0], minlength=len(part.cell_ids))
        levels = s2.levels_of(part.cell_ids)
        assert counts.min() >= tau_min
        assert (counts[levels < 30] <= t_max).all()
        # Disjoint cells: no cell of a partition contains another, so a photo is in at most one.
        for level in np.unique(levels):
            finer = part.cell_ids[levels > level]
            assert not np.isin(s2.parent_ids(finer, int(level)), part.cell_ids[levels == level]).any()
    parents = P.link_parents(parts)
    for k, fine in enumerate(parts):
        for coarse in parts[:k]:
            # Exactly one parent: brute force over every coarser cell that contains the fine one.
            contains = np.zeros(len(fine.cell_ids), dtype=int)
            fl, cl = s2.levels_of(fine.cell_ids), s2.levels_of(coarse.cell_ids)
            for level in np.unique(cl):
                ok = fl >= level
                contains[ok] += np.isin(s2.parent_ids(fine.cell_ids[ok], int(level)), coarse.cell_ids[cl == level])
            assert (contains == 1).all()
            assert (parents[fine.name][coarse.name] >= 0).all()
    return leaf


def test_adaptive_partitions_respect_taus_and_nest(yfcc, capsys):
    lat, lon = yfcc
    tau_min, tau_max = P.default_taus(len(lat))
    parts = P.build_partitions(lat, lon, tau_min, tau_max)
    sizes = [len(p.cell_ids) for p in parts]
    assert [p.name for p in parts] == ["coarse", "middle", "fine"]
    assert sizes == sorted(sizes) and sizes[0] > 50
    leaf = _check(parts, lat, lon, tau_min, tau_max)
    # Class2GPS means lie inside their own cells.
    parents = P.link_parents(parts)
    by_name = {p.name: p for p in parts}
    for part in parts:
        table = P.cell_table(part, P.assign(leaf, part.cell_ids), lat, lon, parents[part.name], by_name)
        inside = P.assign(s2.leaf_ids(table["lat"], table["lon"]), part.cell_ids)
        assert (inside == np.arange(len(table))).all()
        assert table["token"].map(type).eq(str).all()


def test_bottomup_partitions_respect_taus_and_nest(yfcc):
    lat, lon = yfcc
    emb = np.random.default_rng(0).normal(size=(len(lat), 16)).astype(np.float32)
    tau_min, tau_max = P.default_taus(len(lat))
    parts = P.build_partitions(lat, lon, tau_min, tau_max, partitioner="bottomup", emb=emb)
    assert len(parts[0].cell_ids) < len(parts[-1].cell_ids)
    _check(parts, lat, lon, tau_min, tau_max)


def test_default_taus_reproduce_mp16_and_scale_down():
    assert P.default_taus(P.MP16_PHOTOS) == (50, [5000, 2000, 1000])
    tau_min, tau_max = P.default_taus(600)
    assert 2 <= tau_min < tau_max[-1] < tau_max[0] < 100


def test_antimeridian_mean_stays_on_the_dateline():
    lat, lon = np.array([-17.0, -17.1, -16.9]), np.array([179.9, -179.9, 179.95])
    part = P.Partition("fine", P.adaptive_cells(s2.leaf_ids(lat, lon), 1, 10))
    table = P.cell_table(part, P.assign(s2.leaf_ids(lat, lon), part.cell_ids), lat, lon, {}, {})
    assert abs(abs(table["lon"].iat[0]) - 180) < 0.2


@pytest.mark.skipif(not CELLS.exists(), reason="GeoEstimation cells not present")
def test_import_geoestimation_keeps_every_token(yfcc):
    files = sorted(CELLS.glob("cells_50_*.csv"))
    parts = P.read_partitions(files)
    assert [len(p.cell_ids) for p in parts] == [3298, 7202, 12893]
    for part, n in zip(parts, (5000, 2000, 1000)):
        raw = pd.read_csv(CELLS / f"cells_50_{n}.csv", skiprows=2, dtype={"hex_id": str})
        assert s2.to_tokens(part.cell_ids) == raw["hex_id"].tolist()
    P.link_parents(parts)  # the published partitions nest
    lat, lon = yfcc
    rows = P.assign(s2.leaf_ids(lat, lon), parts[-1].cell_ids)
    assert (rows >= 0).mean() > 0.5


def test_bad_cell_file_names_the_file(tmp_path):
    bad = tmp_path / "cells.csv"
    bad.write_text("a\nb\nclass_label,hex_id\n0,zz\n")
    with pytest.raises(ValueError, match="cells.csv"):
        P.read_geoestimation_csv(bad)
