"""Accuracy when the country is known: each query constrained to its true country (``--within``) against the
same queries unconstrained, in one run, on a bundle and held-out photographers' precomputed embeddings::

    python benchmarks/eval_constraints.py --index /tmp/real12k/bundle --queries /tmp/real12k/queries.parquet

The queries (``benchmarks/realistic.py``'s ``queries.parquet``: ``id, lat, lon, AUTHOR, embedding``) are by
photographers the bundle never saw. Each query is answered unconstrained, then hard-constrained to the country
its true coordinates lie in (Natural Earth shapes, as ``Answer.country``), then soft (``--weights``); queries at
sea (in no country's shape: their true country is not defined) or in a country where the gallery has no photo
(an empty constraint) are left out of all of them. Reported per setting: accuracy at 1/25/200/750/2500 km, median
error, the share of answers inside the true country's constraint (its shape or off its coast: ``COAST_KM``),
and the gain over unconstrained at 25 and 200 km with its photographer-clustered standard error. Prints one JSON object and a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd

from geo.core.geodesy import THRESHOLDS_KM, haversine_km
from geo.core.splits import clustered_se
from geo.data.constraint import Constraint
from geo.data.countries import country_index, country_names
from geo.query.index import GeoIndex, open_index


def answer(index: GeoIndex, emb: np.ndarray, shapes: np.ndarray, mode: str | None,
           weight: float | None) -> tuple[np.ndarray, float]:
    """(answers [n, 2], seconds): all queries unconstrained (``weight`` None: no constraint at all), or each
    country's queries constrained to it (``weight`` 0: hard)."""
    start = time.perf_counter()
    out = np.full((len(emb), 2), np.nan)
    if weight is None:
        got = index.locate_embeddings(emb, mode=mode)
        out[:] = [(a.lat, a.lon) for a in got]
        return out, time.perf_counter() - start
    for shape in np.unique(shapes):
        rows = np.flatnonzero(shapes == shape)
        within = _country(int(shape), weight)
        got = index.locate_embeddings(emb[rows], mode=mode, within=within)
        out[rows] = [(a.lat, a.lon) for a in got]
    return out, time.perf_counter() - start


def _country(shape: int, weight: float) -> Constraint:
    """The constraint to one country shape, named as a person would (its Natural Earth name)."""
    within = Constraint.countries(country_names()[shape]).weighted(weight or None)
    assert shape in within.shapes, (shape, within)
    return within


def scores(err: np.ndarray) -> dict[str, float]:
    out = {f"{t} km": round(100 * float((err <= t).mean()), 1) for t in THRESHOLDS_KM}
    out["median km"] = round(float(np.median(err)), 0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--index", required=True)
    ap.add_argument("--queries", required=True, help="Parquet: lat, lon, AUTHOR, embedding")
    ap.add_argument("--mode", default=None, help="the mode to answer in (default: the bundle's)")
    ap.add_argument("--weights", type=float, nargs="*", default=[0.1], help="soft --within-weight values to add")
    ap.add_argument("--limit", type=int, default=None, help="only the first N queries")
    args = ap.parse_args()

    q = pd.read_parquet(args.queries)
    q = q.iloc[:args.limit] if args.limit else q
    index = open_index(args.index, device="cpu")
    mode = args.mode or index.default_mode
    shapes = country_index(q["lat"].to_numpy(float), q["lon"].to_numpy(float))
    covered = np.isin(shapes, country_index(index.knn.lat, index.knn.lon))  # a country with no gallery photo
    on_land = shapes >= 0                                                   # cannot be constrained to
    q, shapes = q[on_land & covered].reset_index(drop=True), shapes[on_land & covered]
    emb = np.stack(q["embedding"].to_numpy()).astype(np.float32)
    truth = q[["lat", "lon"]].to_numpy(float)
    groups = q["AUTHOR"].astype(str).to_numpy()

    settings = {"unconstrained": None, "true country (hard)": 0.0,
                **{f"true country (soft, weight {w:g})": w for w in args.weights}}
    hits, report = {}, {"queries": int(len(q)), "at sea, left out": int((~on_land).sum()),
                        "in a country without gallery photos, left out": int((on_land & ~covered).sum()),
                        "countries": int(len(np.unique(shapes))), "photographers": int(len(np.unique(groups))),
                        "mode": mode, "settings": {}}
    for name, weight in settings.items():
        pred, seconds = answer(index, emb, shapes, mode, weight)
        err = haversine_km(truth[:, 0], truth[:, 1], pred[:, 0], pred[:, 1])
        inside = np.zeros(len(pred), bool)  # inside the true country's constraint (its shape, or off its coast)
        for shape in np.unique(shapes):
            rows = np.flatnonzero(shapes == shape)
            inside[rows] = _country(int(shape), 0.0).contains(pred[rows, 0], pred[rows, 1])
        hits[name] = {t: (err <= t).astype(float) for t in (25, 200)}
        row = {**scores(err), "answers inside %": round(100 * float(inside.mean()), 2),
               "seconds": round(seconds, 1)}
        if weight is not None:
            for t in (25, 200):
                d = hits[name][t] - hits["unconstrained"][t]
                row[f"gain at {t} km"] = f"{100 * d.mean():+.1f} ± {100 * clustered_se(d, groups):.1f}"
        report["settings"][name] = row
    print(json.dumps(report, indent=2))
    _table(report)


def _table(report: dict) -> None:
    cols = [f"{t} km" for t in THRESHOLDS_KM] + ["median km", "answers inside %", "gain at 25 km",
                                                  "gain at 200 km"]
    print("| setting | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, row in report["settings"].items():
        print(f"| {name} | " + " | ".join(str(row.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    main()
