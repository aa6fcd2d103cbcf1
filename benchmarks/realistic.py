"""A realistic synthetic testbed of precomputed image embeddings, for judging geolocation methods.

    python benchmarks/realistic.py --photos 30000 --queries 2000 --out /tmp/geo-real
    geo build-index --embeddings /tmp/geo-real/gallery.parquet --backbone synthetic-512 \
        --group AUTHOR --out /tmp/geo-real/bundle
    geo bench custom --index /tmp/geo-real/bundle --embeddings /tmp/geo-real/queries.parquet --mode all

``benchmarks/bench_scale.py``'s generator is a load test, not an accuracy test: every photo carries a
strong place signal and every place has many photographers, so kNN answers 99.6 % of its queries
within 25 km. Real CLIP-class features on Im2GPS3k answer 30-45 % within 25 km and 70-85 % within
2500 km, and different methods win at different scales. This generator aims at that regime.

What a photo is made of (every part a unit direction times a weight, summed, then L2-normalised):

* **Where** (real places and photographers). Photos are drawn from YFCC26k's 25,600 geotagged
  photos (``../shared/data/yfcc/yfcc25600_places365.csv``): each *burst* of photos picks one real
  photo as its anchor, takes its photographer (the real ``AUTHOR``: no clones, so photographers keep
  their real geography and heavy users stay heavy) and lands near it (same spot, elsewhere in town or
  a day trip away). A photo has the burst's place plus a few tens of metres.
* **Location signal at five scales**: continent, country and region (admin1) of the nearest GeoNames
  ``cities1000`` place (through :mod:`geo.data.places`), city (S2 cells at levels 8, 9 and 10, summed:
  a metro area, a town, a district) and spot (an S2 cell of ~600 m).
  Each key has a fixed random direction. A photo reveals the scales down to its own finest one
  (a landmark reveals the spot; a street the city; a forest only the region or continent), drawn
  per burst, and its signal has a per-burst strength. Coarse scales have weak directions (no single
  neighbour shows them, but a classifier trained on thousands of photos does); fine scales strong
  ones (a neighbour at the same spot is found, but only where another photographer was).
* **Climate**: a smooth function of the coordinates (random Fourier features of the unit vector at
  continental and regional wavelengths), what vegetation, light and building styles give away.
* **No location signal at all** for a share of bursts (default 25 %): mostly indoor scenes (food,
  pets, parties), by the real photo's Places365 indoor/natural/urban label.
* **Scene**: the real photo's Places365 class (or another drawn from the data) as a direction
  shared worldwide: a beach in Brazil looks like a beach in Thailand. A distractor for kNN.
* **Photographer style**: one direction per photographer, at every place they go. In a gallery
  split at random, a query's nearest neighbours are its photographer's other photos (the leak that
  photographer-disjoint splits defend against); here queries are by photographers the gallery
  never saw.
* **Bursts of near-duplicates**: a burst shares its noise; each photo adds a little of its own,
  so photos of a burst have cosine similarity ~0.98.

Calibration targets (photographer-disjoint queries, a gallery of 20-30K photos, default weights;
measured numbers in benchmarks/RESULTS.md, "A realistic synthetic testbed"):

* kNN (``--mode knn``) 30-50 % within 25 km and ~70-85 % within 2500 km;
* the cell heads (``--mode cells``) ahead of kNN at 750 and 2500 km; kNN ahead at 1 and 25 km;
* 20-30 % of photos with no location signal (the ``signal`` column says which);
* every single mode the best of all at some threshold or close to it (the testbed leaves room for
  fusion to do better than any one of them).

Deterministic: the same arguments give the same bytes (one seed drives all draws; every key's
direction is seeded by the seed and the key itself, so it does not depend on which keys appear).
"""
from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from geo.core import s2
from geo.core.geodesy import EARTH_RADIUS_KM, latlon_to_xyz
from geo.data.places import nearest_places

YFCC = Path(__file__).resolve().parents[2] / "shared" / "data" / "yfcc" / "yfcc25600_places365.csv"
CONTINENTS = Path(__file__).resolve().parents[1] / "geo" / "eval" / "continents.csv"
SCALES = ("continent", "country", "region", "city", "spot")
# S2 levels of a "city" (GeoNames' nearest place is often a suburb): a metro area of ~40 km, a town of ~20 km and
# a district of ~10 km, summed, so the nearer of two photos in one city also looks the more alike
CITY_LEVELS = (8, 9, 10)
SPOT_LEVEL = 14  # S2 level of a "spot": cells of ~0.4 km2
COLUMNS = ("id", "lat", "lon", "AUTHOR", "embedding")  # what geo reads; the rest are kept as extras


@dataclass(frozen=True)
class Recipe:
    """The generator's knobs. The defaults are the calibrated testbed (module docstring)."""

    dim: int = 512
    no_signal_share: float = 0.25     # bursts with no location signal at all
    # P(the finest scale a burst reveals is at least this fine), continent .. spot, for bursts with signal
    reveal: tuple[float, ...] = (1.0, 0.9, 0.85, 0.8, 0.45)
    scale_weights: tuple[float, ...] = (0.3, 0.4, 0.45, 1.0, 0.6)
    climate_weight: float = 0.3
    scene_weight: float = 0.5
    style_weight: float = 0.5
    noise_weight: float = 0.5
    own_noise: float = 0.25           # share of a photo's noise that is its own (the rest is its burst's)
    strength: tuple[float, float] = (0.6, 1.4)  # a burst's location signal strength, uniform in this range
    burst_mean: float = 2.5           # photos per burst (geometric)
    # a burst's distance from its anchor: (probability, typical km): same spot, elsewhere in town, day trip
    trips: tuple[tuple[float, float], ...] = ((0.6, 0.3), (0.3, 5.0), (0.1, 40.0))
    scene_kept: float = 0.5           # a burst shows its anchor's scene with this probability, else any


def _stable(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def directions(keys: np.ndarray, salt: str, dim: int, seed: int) -> np.ndarray:
    """A fixed random unit direction per key, [len(keys), dim]; a key of "" gets a zero vector.

    Seeded by (seed, salt, key): gallery and queries, or two sizes of the testbed, share the
    direction of every place they share."""
    uniq, inv = np.unique(np.asarray(keys, dtype=str), return_inverse=True)
    table = np.zeros((len(uniq), dim), np.float32)
    for k, key in enumerate(uniq):
        if key:
            h = _stable(f"{salt}:{key}")
            table[k] = np.random.default_rng([seed, h & 0xFFFFFFFF, h >> 32]).standard_normal(dim)
    norms = np.linalg.norm(table, axis=1, keepdims=True)
    return (table / np.where(norms > 0, norms, 1))[inv]


def climate(lat: np.ndarray, lon: np.ndarray, dim: int, seed: int, features: int = 64) -> np.ndarray:
    """A smooth map of the coordinates into the embedding: random Fourier features of the unit vector
    at continental (~5,000 km) and regional (~800 km) wavelengths, each on its own direction."""
    rng = np.random.default_rng([seed, 7])
    scales = np.where(np.arange(features) < features // 2, 8.0, 50.0)  # rad^-1 on the unit sphere
    omega = rng.standard_normal((features, 3)) * scales[:, None] / np.sqrt(3)
    phase = rng.uniform(0, 2 * np.pi, features)
    basis = rng.standard_normal((features, dim)).astype(np.float32) / np.sqrt(dim)
    f = np.cos(latlon_to_xyz(lat, lon) @ omega.T + phase) * np.sqrt(2 / features)
    return (f.astype(np.float32) @ basis).astype(np.float32)


def load_yfcc(path: Path = YFCC) -> pd.DataFrame:
    """YFCC26k's photos with what the generator keys on: author, place, scene, indoor/natural/urban."""
    base = pd.read_csv(path, usecols=["IMG_ID", "AUTHOR", "LAT", "LON", "S3_Label", "S365_Label"])
    return base.dropna(subset=["LAT", "LON"]).reset_index(drop=True)


def _offsets(rng: np.random.Generator, lat: np.ndarray, lon: np.ndarray, km: np.ndarray):
    """Points ``km`` away (exponentially distributed around it) in a random direction (flat-earth: < 200 km)."""
    d = rng.exponential(km)
    bearing = rng.uniform(0, 2 * np.pi, len(km))
    dlat = np.degrees(d * np.cos(bearing) / EARTH_RADIUS_KM)
    dlon = np.degrees(d * np.sin(bearing) / EARTH_RADIUS_KM) / np.maximum(np.cos(np.radians(lat)), 0.05)
    return np.clip(lat + dlat, -89.9, 89.9), (lon + dlon + 180) % 360 - 180


def bursts(base: pd.DataFrame, photos: int, recipe: Recipe, rng: np.random.Generator,
           anchors: np.ndarray | None = None) -> pd.DataFrame:
    """One row per burst: anchor photo, photographer, place, scene, signal and finest scale revealed, size
    (``anchors``: the rows of ``base`` a burst may start from; default every row)."""
    sizes = rng.geometric(1 / recipe.burst_mean, int(photos / recipe.burst_mean * 1.3) + 16)
    sizes = sizes[:np.searchsorted(np.cumsum(sizes), photos) + 1]
    sizes[-1] -= int(sizes.sum() - photos)
    n = len(sizes)
    anchor = rng.integers(0, len(base), n) if anchors is None else np.asarray(anchors)[rng.integers(0, len(anchors), n)]
    trip_p, trip_km = (np.array(x) for x in zip(*recipe.trips))
    km = trip_km[rng.choice(len(trip_p), n, p=trip_p / trip_p.sum())]
    lat, lon = _offsets(rng, base["LAT"].to_numpy()[anchor], base["LON"].to_numpy()[anchor], km)
    scene = np.where(rng.random(n) < recipe.scene_kept, base["S365_Label"].to_numpy()[anchor],
                     base["S365_Label"].to_numpy()[rng.integers(0, len(base), n)])
    indoor = _indoor_share(base)[scene]
    # no-signal odds by scene type: indoor scenes far more often carry nothing of the place
    odds = np.where(indoor > 0.5, 6.0, 0.6)
    p = np.clip(recipe.no_signal_share * odds / np.average(odds, weights=sizes), 0, 0.95)
    signal = rng.random(n) >= p
    reveal = np.asarray(recipe.reveal)
    finest = (rng.random(n)[:, None] < reveal[None, :]).sum(axis=1) - 1  # nested: 0 continent .. 4 spot
    return pd.DataFrame({"anchor": anchor, "AUTHOR": base["AUTHOR"].astype(str).to_numpy()[anchor],
                         "lat": lat, "lon": lon, "scene": scene, "signal": signal,
                         "finest": np.where(signal, finest, -1),
                         "strength": rng.uniform(*recipe.strength, n), "size": sizes})


def _indoor_share(base: pd.DataFrame) -> np.ndarray:
    """Per Places365 class (0-364), the share of YFCC26k's photos of that class labelled indoor."""
    share = base.groupby("S365_Label")["S3_Label"].apply(lambda s: float(np.mean(s == 0)))
    return share.reindex(range(365), fill_value=0.0).to_numpy()


def place_keys(lat: np.ndarray, lon: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Each point's keys at every scale: continent, country code and admin1 of the nearest GeoNames place,
    then S2 cells for the city (one key per level of :data:`CITY_LEVELS`) and the spot."""
    places = nearest_places(lat, lon)
    cc = np.array([p.get("cc") or "" for p in places], dtype=object)
    admin1 = np.array([p.get("admin1") or "" for p in places], dtype=object)
    table = pd.read_csv(CONTINENTS, comment="#", keep_default_na=False)
    continent = pd.Series(cc).map(dict(zip(table["cc"], table["continent"]))).fillna("").to_numpy(object)
    leaf = s2.leaf_ids(lat, lon)
    city = [s2.parent_ids(leaf, level).astype(np.uint64).astype(str) for level in CITY_LEVELS]
    spot = s2.parent_ids(leaf, SPOT_LEVEL).astype(np.uint64).astype(str)
    return {"continent": [continent], "country": [cc], "region": [cc + "/" + admin1], "city": city, "spot": [spot]}


def _unit_noise(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def embed_bursts(b: pd.DataFrame, recipe: Recipe, seed: int, draw_seed: int | None = None) -> np.ndarray:
    """Each burst's shared embedding (before its photos' own noise), not normalised, [len(b), dim]: directions
    seeded by ``seed``, noise by ``draw_seed`` (default ``seed``)."""
    dim, rng = recipe.dim, np.random.default_rng([seed if draw_seed is None else draw_seed, 3])
    keys = place_keys(b["lat"].to_numpy(), b["lon"].to_numpy())
    gain = np.where(b["signal"], b["strength"], 0.0).astype(np.float32)[:, None]
    emb = recipe.climate_weight * gain * climate(b["lat"].to_numpy(), b["lon"].to_numpy(), dim, seed)
    for level, (scale, w) in enumerate(zip(SCALES, recipe.scale_weights)):
        shown = (b["finest"].to_numpy() >= level)[:, None]
        d = sum(directions(k, f"{scale}{i}", dim, seed) for i, k in enumerate(keys[scale])) / np.sqrt(len(keys[scale]))
        emb += np.where(shown, w * gain * d, 0)
    emb += recipe.scene_weight * directions(b["scene"].astype(str).to_numpy(), "scene", dim, seed)
    emb += recipe.style_weight * directions(b["AUTHOR"].to_numpy(), "style", dim, seed)
    emb += recipe.noise_weight * np.sqrt(1 - recipe.own_noise ** 2) * _unit_noise(rng, len(b), dim)
    return emb


def generate(photos: int, seed: int = 0, recipe: Recipe = Recipe(), base: pd.DataFrame | None = None,
             anchors: np.ndarray | None = None, draw_seed: int | None = None) -> pd.DataFrame:
    """``photos`` synthetic photos: id, lat, lon, AUTHOR, embedding (L2-normalised float32) and the
    generator's own truth (burst, scene, signal, finest scale revealed) as extra columns. ``anchors``: the
    base rows bursts start from (:func:`bursts`); ``draw_seed``: another seed for every draw but the directions
    (default ``seed``), so photos made with it share a testbed's embedding space but none of its noise."""
    base = load_yfcc() if base is None else base
    rng = np.random.default_rng(seed if draw_seed is None else draw_seed)
    b = bursts(base, photos, recipe, rng, anchors)
    shared = embed_bursts(b, recipe, seed, draw_seed)
    which = np.repeat(np.arange(len(b)), b["size"].to_numpy())
    lat, lon = _offsets(rng, b["lat"].to_numpy()[which], b["lon"].to_numpy()[which], np.full(len(which), 0.03))
    emb = shared[which] + recipe.noise_weight * recipe.own_noise * _unit_noise(rng, len(which), recipe.dim)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    finest = b["finest"].to_numpy()[which]
    return pd.DataFrame({
        "id": [f"r{seed}-{i:07d}" for i in range(len(which))], "lat": lat, "lon": lon,
        "AUTHOR": b["AUTHOR"].to_numpy()[which], "burst": which.astype(np.int64),
        "scene": b["scene"].to_numpy()[which].astype(np.int16),
        "signal": b["signal"].to_numpy()[which].astype(np.int8),
        "finest": np.array(["none", *SCALES], dtype=object)[finest + 1],
        "embedding": list(emb.astype(np.float32)),
    })


def split_by_photographer(df: pd.DataFrame, queries: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(gallery, queries): whole photographers, drawn in a seeded order, go to the queries until about
    ``queries`` photos are there; no photographer is on both sides."""
    counts = df.groupby("AUTHOR").size()
    order = counts.index.to_numpy()[np.random.default_rng([seed, 11]).permutation(len(counts))]
    taken, chosen = 0, []
    for author in order:
        c = int(counts[author])
        if taken + c <= queries:
            chosen.append(author)
            taken += c
        if taken >= queries:
            break
    q = df["AUTHOR"].isin(set(chosen)).to_numpy()
    return df[~q].reset_index(drop=True), df[q].reset_index(drop=True)


def unseen_queries(gallery: Path, photos: int, seed: int, recipe: Recipe) -> pd.DataFrame:
    """More queries for a testbed: ``photos`` photos by the YFCC photographers its gallery lacks (its queries'
    and those never drawn), in its embedding space (its ``seed``) with draws of their own (``seed + 1``)."""
    base = load_yfcc()
    seen = set(pq.read_table(gallery, columns=["AUTHOR"]).column(0).to_pylist())
    anchors = np.flatnonzero(~base["AUTHOR"].astype(str).isin(seen).to_numpy())
    out = generate(photos, seed, recipe, base, anchors, draw_seed=seed + 1)
    return out.assign(id=[f"u{seed}-{i:07d}" for i in range(len(out))])


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    """One Parquet file, the embedding as a fixed-size list of float32 (what ``--embeddings`` reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df.drop(columns=["embedding"]), preserve_index=False)
    mat = np.stack(df["embedding"].to_numpy()).astype(np.float32)
    flat = pa.array(mat.reshape(-1))
    table = table.append_column("embedding", pa.FixedSizeListArray.from_arrays(flat, mat.shape[1]))
    pq.write_table(table, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=30_000, help="gallery + queries (up to ~150K)")
    ap.add_argument("--queries", type=int, default=2_000, help="about this many query photos, by photographers "
                    "the gallery does not have")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--no-signal-share", type=float, default=Recipe.no_signal_share)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True, help="folder for gallery.parquet and queries.parquet")
    ap.add_argument("--unseen-by", type=Path, help="a testbed's gallery.parquet: write only queries.parquet, --photos "
                    "photos by every YFCC photographer absent from it (same --seed and --dim as that testbed)")
    args = ap.parse_args()
    recipe = Recipe(dim=args.dim, no_signal_share=args.no_signal_share)
    if args.unseen_by:
        queries = unseen_queries(args.unseen_by, args.photos, args.seed, recipe)
        write_parquet(queries, args.out / "queries.parquet")
        print(f"queries: {len(queries):,} photos by {queries['AUTHOR'].nunique():,} photographers absent from "
              f"{args.unseen_by} -> {args.out / 'queries.parquet'}")
        return
    gallery, queries = split_by_photographer(generate(args.photos, args.seed, recipe), args.queries, args.seed)
    write_parquet(gallery, args.out / "gallery.parquet")
    write_parquet(queries, args.out / "queries.parquet")
    for name, df in (("gallery", gallery), ("queries", queries)):
        print(f"{name}: {len(df):,} photos by {df['AUTHOR'].nunique():,} photographers, "
              f"{100 * (1 - df['signal'].mean()):.1f} % without location signal -> {args.out / (name + '.parquet')}")


if __name__ == "__main__":
    main()
