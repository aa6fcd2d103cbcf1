"""Trips located together against each photo alone, on held-out photographers of the realistic testbed.

    python benchmarks/realistic.py --photos 12000 --queries 1500 --out /tmp/real12k
    geo build-index --embeddings /tmp/real12k/gallery.parquet --backbone synthetic-512 --group AUTHOR \\
        --out /tmp/real12k/bundle
    python benchmarks/eval_trips.py --index /tmp/real12k/bundle --queries /tmp/real12k/queries.parquet

A trip is one query photographer's photos (photographers the gallery never saw; at least ``--min-photos``).
Their places are real (:mod:`benchmarks.realistic` puts each burst of photos near one of the photographer's
real YFCC26k photos); their times are not in the data and are synthesized here as a traveller would take
them, seeded, from the places alone (never from the answers):

* the photographer's bursts are grouped into stops (bursts within ``STOP_KM`` of each other), visited in a
  greedy nearest-next order from a random first stop;
* inside a burst photos are a minute or two apart; between bursts of one stop, 30 min to 5 h;
* between stops, the travel time (on the ground at 40-90 km/h up to 600 km, else a flight at 500-850 km/h
  plus 2-4 h at airports) plus a stay of 8-40 h.

So no true leg breaks the 900 km/h bound; the soft preference for near spots (``Travel.ground_kmh``) is a
property the generator shares with real travel (most legs are on the ground), not a copy of its numbers.
Each photo is scored alone (the fused answer, `geo query`'s default) and with its trip
(``locate_embeddings(..., trips=...)``); the difference gets a photographer-clustered standard error.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from geo.core.geodesy import THRESHOLDS_KM, haversine_km
from geo.core.splits import clustered_se
from geo.query.index import open_index
from geo.query.trip import Travel, Trips
from geo.stages.fusion.calibration import reliability_table

STOP_KM = 50.0


def stops(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Stop label per burst: single-linkage groups of bursts within :data:`STOP_KM`."""
    label = np.arange(len(lat))
    d = haversine_km(lat[:, None], lon[:, None], lat[None], lon[None])
    for i, j in zip(*np.nonzero(d <= STOP_KM)):
        a, b = label[i], label[j]
        if a != b:
            label[label == max(a, b)] = min(a, b)
    return label


def leg_hours(km: float, rng: np.random.Generator) -> float:
    """Travel plus stay between two stops ``km`` apart (module docstring)."""
    travel = km / rng.uniform(40, 90) if km <= 600 else km / rng.uniform(500, 850) + rng.uniform(2, 4)
    return travel + rng.uniform(8, 40)


def route(photos: pd.DataFrame, rng: np.random.Generator) -> pd.Series:
    """One photographer's photos' times (hours), by the travel of the module docstring."""
    bursts = photos.groupby("burst")[["lat", "lon"]].mean()
    label = stops(bursts["lat"].to_numpy(), bursts["lon"].to_numpy())
    centre = bursts.groupby(label)[["lat", "lon"]].mean()
    todo = list(centre.index)
    here = todo.pop(int(rng.integers(len(todo))))
    order = [here]
    while todo:  # greedy nearest next stop
        d = haversine_km(centre.loc[here, "lat"], centre.loc[here, "lon"], centre.loc[todo, "lat"].to_numpy(),
                         centre.loc[todo, "lon"].to_numpy())
        here = todo.pop(int(np.argmin(d)))
        order.append(here)
    t, times, last = 0.0, {}, None
    for stop in order:
        if last is not None:
            t += leg_hours(float(haversine_km(*centre.loc[last], *centre.loc[stop])), rng)
        for k, b in enumerate(rng.permutation(bursts.index[label == stop])):
            t += rng.uniform(0.5, 5.0) if k else 0.0
            for pid in photos.index[photos["burst"] == b]:
                times[pid] = t
                t += rng.uniform(1, 2) / 60
        last = stop
    return pd.Series(times)


def trips(queries: pd.DataFrame, min_photos: int, seed: int, max_photos: int | None = None) -> pd.DataFrame:
    """The query photographers with ``min_photos`` to ``max_photos`` photos, each photo with its synthesized
    time."""
    rng = np.random.default_rng(seed)
    counts = queries.groupby("AUTHOR").size()
    sizes = (counts >= min_photos) & (counts <= (max_photos or counts.max()))
    keep = queries[queries["AUTHOR"].isin(counts.index[sizes])].copy()
    keep["hours"] = pd.concat([route(g, rng) for _, g in keep.groupby("AUTHOR", sort=True)])
    return keep


def accuracy(err: np.ndarray) -> list[float]:
    return [100 * float((err <= t).mean()) for t in THRESHOLDS_KM]


def report(name: str, alone: np.ndarray, joint: np.ndarray, groups: np.ndarray) -> None:
    print(f"{name}: {len(alone)} photos in {len(set(groups))} trips")
    print(f"  {'km':>6} {'alone %':>8} {'trip %':>8} {'diff':>6} {'SE':>5}")
    for t, a, j in zip(THRESHOLDS_KM, accuracy(alone), accuracy(joint)):
        se = 100 * clustered_se((joint <= t).astype(float) - (alone <= t), groups)
        print(f"  {t:>6} {a:>8.2f} {j:>8.2f} {j - a:>+6.2f} {se:>5.2f}")
    print(f"  median error {np.median(alone):.1f} km alone, {np.median(joint):.1f} km with the trip")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True)
    ap.add_argument("--queries", required=True, help="realistic.py's queries.parquet (id, lat, lon, AUTHOR, burst)")
    ap.add_argument("--min-photos", type=int, default=5)
    ap.add_argument("--max-photos", type=int, default=None, help="trips of at most this many photos (3-4: the "
                    "trips the constants of geo.query.trip were chosen on)")
    ap.add_argument("--speed-kmh", type=float, default=Travel.speed_kmh)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    q = trips(pd.read_parquet(args.queries), args.min_photos, args.seed, args.max_photos)
    index = open_index(args.index)
    emb = np.stack(q["embedding"].to_numpy()).astype(np.float32)
    start = time.perf_counter()
    alone = index.locate_embeddings(emb, mode="fused")
    mid = time.perf_counter()
    joint = index.locate_embeddings(emb, mode="fused", trips=Trips(q["AUTHOR"].tolist(), q["hours"].to_numpy(),
                                                                   Travel(speed_kmh=args.speed_kmh)))
    end = time.perf_counter()
    lat, lon = q["lat"].to_numpy(), q["lon"].to_numpy()
    err = [haversine_km(lat, lon, np.array([a.lat for a in got]), np.array([a.lon for a in got])) for got in (alone, joint)]
    groups = q["AUTHOR"].to_numpy()
    report(f"trips of {args.min_photos}-{args.max_photos or 'any'} photos", err[0], err[1], groups)
    places = q.groupby("AUTHOR")["burst"].transform("nunique").to_numpy() >= 2
    report("  of which trips through two or more places (bursts)", err[0][places], err[1][places], groups[places])
    for t in ("25", "200", "750"):
        stated = [np.array([a.p_within.get(t, np.nan) for a in got]) for got in (alone, joint)]
        print(f"p_within {t} km: alone states {np.nanmean(stated[0]):.3f} (observed {np.mean(err[0] <= int(t)):.3f}), "
              f"with the trip {np.nanmean(stated[1]):.3f} (observed {np.mean(err[1] <= int(t)):.3f}); with the trip "
              f"by stated bin: " + "  ".join(f"{r['bin']} n={r['n']} {r['predicted']:.2f}->{r['observed']:.2f}"
                                            for r in reliability_table(stated[1], err[1] <= int(t))))
    print(f"time: alone {mid - start:.1f} s, with trips {end - mid:.1f} s for {len(q)} photos")


if __name__ == "__main__":
    main()
