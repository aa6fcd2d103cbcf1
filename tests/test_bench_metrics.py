"""Metrics: the GeoEstimation footers are the ground truth for our conventions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from geo.eval.metrics import (
    bootstrap_ci,
    breakdown,
    distances_km,
    geoestimation_footer,
    geoscore,
    summarize,
)
from geo.eval.suites import shared_data_dir
from geo.store.predictions import read_scored_file

RESULTS = shared_data_dir() / "geoestimation" / "results"
FILES = sorted(RESULTS.glob("*/*.csv")) if RESULTS.is_dir() else []


def test_all_twelve_result_files_are_present():
    if not RESULTS.is_dir():
        pytest.skip(f"{RESULTS} not available")
    assert {p.parent.name for p in FILES} == {"im2gps", "im2gps3k"}
    assert len(FILES) == 12, [p.name for p in FILES]


@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.name}/{p.stem}" for p in FILES])
def test_reproduces_geoestimation_footer_exactly(path: Path):
    df, footer = read_scored_file(path)
    assert len(df) == {"im2gps": 237, "im2gps3k": 2997}[path.parent.name]
    summary = summarize(df["error_km"], ci=False)
    assert geoestimation_footer(summary) == footer
    # and the per-row distances agree with the file's own column to its 2 printed decimals
    theirs = np.loadtxt(path, delimiter=",", skiprows=1, usecols=5, max_rows=len(df))
    assert np.abs(df["error_km"].to_numpy() - theirs).max() < 0.0055


def test_threshold_is_inclusive_and_counts_are_fractions():
    s = summarize(np.array([1.0, 25.0, 25.0001, 3000.0]), ci=False)
    assert s["acc"] == {"1": 0.25, "25": 0.5, "200": 0.75, "750": 0.75, "2500": 0.75}
    assert s["median_km"] == pytest.approx(25.00005)
    assert s["n"] == 4 and s["n_total"] == 4


def test_missing_and_failed_are_reported_not_dropped_silently():
    s = summarize(np.array([0.5, 10.0]), n_missing=1, n_failed=1, ci=False)
    assert (s["n"], s["n_total"], s["n_missing"], s["n_failed"]) == (2, 4, 1, 1)
    assert s["acc"]["1"] == 0.5
    assert s["acc_over_total"]["1"] == 0.25  # missing and failed photos count as misses here


def test_geoscore_matches_osv5m_definition():
    assert geoscore(0.0) == 5000.0
    assert geoscore(1492.7) == pytest.approx(5000 / np.e)


def test_geodesic_differs_from_sphere_by_the_ellipsoid_only():
    # Quito to Helsinki: WGS84 and the 6371 km sphere agree within 0.5 %
    h = distances_km(-0.18, -78.47, 60.17, 24.94, "haversine")
    g = distances_km(-0.18, -78.47, 60.17, 24.94, "geodesic")
    assert abs(h - g) / g < 0.005 and h != g
    # one degree of latitude at the equator is 110.574 km on WGS84 (Karney), 111.195 km on the sphere
    assert distances_km(0.0, 0.0, 1.0, 0.0, "geodesic") == pytest.approx(110.574, abs=1e-3)
    with pytest.raises(ValueError, match="unknown distance"):
        distances_km(0, 0, 1, 1, "manhattan")


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    d = np.random.default_rng(1).exponential(800, size=500)
    a, b = bootstrap_ci(d, n_boot=200, seed=3), bootstrap_ci(d, n_boot=200, seed=3)
    assert a == b
    lo, hi = a["acc"]["750"]
    assert lo < (d <= 750).mean() < hi
    assert a["median_km"][0] < np.median(d) < a["median_km"][1]


def test_breakdown_groups_unknown_labels():
    groups = breakdown(np.array([1.0, 2.0, 3000.0]), ["urban", None, "urban"], ci=False)
    assert groups["urban"]["n"] == 2 and groups["unknown"]["n"] == 1
