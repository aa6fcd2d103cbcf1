"""The country lookup against an older one, in the same process: one point at a time and YFCC in bulk.

    git worktree add /tmp/before f582cd1            # the tree before the shapely lookup (its shapes file beside it)
    python benchmarks/bench_countries.py --old /tmp/before/geo/data/countries.py

Prints each lookup's first call (reading the shapes), the median and least time of one point over 200 YFCC
photos, all 25,600 YFCC photos in one call, the share it puts at sea (no country), and where the two disagree.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from geo.data import countries

YFCC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "yfcc" / "yfcc25600_places365.csv"


def _module(path: str):
    spec = importlib.util.spec_from_file_location("old_countries", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_countries"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="geo/data/countries.py of an older tree (a worktree: it reads the shapes beside it)")
    ap.add_argument("--yfcc", default=str(YFCC))
    a = ap.parse_args()
    lookups = {"old": _module(a.old), "new": countries}
    for name, m in lookups.items():
        t = time.perf_counter()
        m.country_index([0.0], [0.0])
        print(f"{name}: first call (reads the shapes) {1000 * (time.perf_counter() - t):.0f} ms")
    df = pd.read_csv(a.yfcc)
    lat, lon = df["LAT"].to_numpy(float), df["LON"].to_numpy(float)
    found = {}
    for name, m in lookups.items():
        one = []
        for la, lo in zip(lat[:200], lon[:200]):
            t = time.perf_counter()
            m.country_index([la], [lo])
            one.append(time.perf_counter() - t)
        t = time.perf_counter()
        found[name] = m.country_index(lat, lon)
        bulk = time.perf_counter() - t
        print(f"{name}: one point median {1000 * statistics.median(one):.3f} ms (least {1000 * min(one):.3f}); "
              f"{len(lat):,} at once {bulk:.2f} s ({1000 * bulk / len(lat):.4f} ms a point); "
              f"at sea {np.mean(found[name] < 0):.2%}")
    differ = found["new"] != found["old"]
    print(f"differ on {int(differ.sum())} photos; all where the old lookup said sea: {bool((found['old'][differ] < 0).all())}")


if __name__ == "__main__":
    main()
