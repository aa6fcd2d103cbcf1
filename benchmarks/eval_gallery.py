"""Accuracy of ``--mode gallery`` on a photographer split, next to the population prior.

Works on (meta, emb) arrays, so it runs on the dev-sample embeddings before the
stage is wired into ``geo build-index`` and on a bundle's embeddings after::

    python benchmarks/eval_gallery.py --npz /tmp/geo-dev/im2gps3k_effnet.npz \\
        --meta-csv /work/shared/data/im2gps3k-dev/im2gps3k_places365.csv --init geoclip --init random

The split assigns whole photographers (AUTHOR) to either the gallery or the
queries, seeded; the gallery stage is built on the gallery photos alone in a
temporary bundle, exactly as ``geo build-index`` would build it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile

import numpy as np
import pandas as pd

from geo.core.geodesy import haversine_km
from geo.core.priors import population_prior
from geo.core.splits import validation_mask
from geo.eval.metrics import THRESHOLDS_KM
from geo.stages.gallery.stage import GalleryConfig, GpsGallery, fit_gallery
from geo.store.bundle import Bundle


def scores(err_km: np.ndarray) -> dict[str, float]:
    out = {f"acc_{t}km": round(100 * float((err_km <= t).mean()), 2) for t in THRESHOLDS_KM}
    out["median_km"] = round(float(np.median(err_km)), 1)
    return out


def photographer_split(meta: pd.DataFrame, query_fraction: float, seed: int, group: str = "AUTHOR") -> np.ndarray:
    """Boolean mask of about ``query_fraction`` of the rows as queries; whole groups go to one side."""
    groups = meta[group].astype(str).to_numpy() if group in meta.columns else np.arange(len(meta))
    return validation_mask(len(meta), groups, query_fraction, seed)


def evaluate(meta: pd.DataFrame, emb: np.ndarray, config: GalleryConfig, seed: int = 0, query_fraction: float = 0.5,
             backbone: str = "dev-embeddings", log=lambda *_: None) -> dict:
    """Build the gallery on the gallery side of the split and answer every query with its best gallery point."""
    query = photographer_split(meta, query_fraction, seed)
    gal_meta, q_meta = meta[~query].reset_index(drop=True), meta[query].reset_index(drop=True)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Bundle.create_or_resume(tmp, {"name": backbone}, emb.shape[1])
        fitted = fit_gallery(gal_meta, emb[~query], config, backbone, log=log)
        files, summary = fitted.save(bundle)
        bundle.commit("gallery", files, summary, replace=("gallery/",))
        info = fitted.info
        latlon, _ = GpsGallery.load(bundle).search(emb[query], k=1)
    err = haversine_km(q_meta.lat, q_meta.lon, latlon[:, 0, 0], latlon[:, 0, 1])
    plat, plon = map(float, population_prior(gal_meta.lat.to_numpy(), gal_meta.lon.to_numpy()))
    prior_err = haversine_km(q_meta.lat, q_meta.lon, plat, plon)
    return {
        "n_gallery": int((~query).sum()), "n_query": int(query.sum()), "n_points": info["n_points"],
        "gallery": scores(err), "prior": scores(prior_err), "prior_latlon": [round(plat, 4), round(plon, 4)],
        "best_epoch": info["train"].get("best_epoch"), "train_seconds": info["seconds"]["train"],
        "logit_scale": round(info["logit_scale"], 2),
    }


def load_npz(path: str, meta_csv: str | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Embeddings and metadata, never unpickling: string arrays saved as object dtype are
    taken from ``meta_csv`` (IMG_ID, AUTHOR, LAT, LON in the same row order) instead."""
    z = np.load(path, allow_pickle=False)
    emb, lat, lon = z["emb"].astype(np.float32), z["lat"].astype(np.float64), z["lon"].astype(np.float64)
    try:
        ids, author = z["ids"].astype(str), z["author"].astype(str)
    except ValueError:
        if meta_csv is None:
            raise ValueError(f"{path}: ids/author are pickled object arrays; pass --meta-csv with IMG_ID and AUTHOR") from None
        df = pd.read_csv(meta_csv)
        if len(df) != len(emb) or not np.allclose(df.LAT, lat) or not np.allclose(df.LON, lon):
            raise ValueError(f"{meta_csv}: rows do not line up with {path} (count or coordinates differ)") from None
        ids, author = df.IMG_ID.astype(str).to_numpy(), df.AUTHOR.astype(str).to_numpy()
    return pd.DataFrame({"id": ids, "lat": lat, "lon": lon, "AUTHOR": author}), emb


def markdown_row(name: str, r: dict) -> str:
    g = r["gallery"]
    return "| " + " | ".join([name, *(f"{g[f'acc_{t}km']:.1f}" for t in THRESHOLDS_KM), f"{g['median_km']:.0f}"]) + " |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--npz", required=True, help="emb, lat, lon, author, ids arrays (the dev-sample embeddings)")
    ap.add_argument("--meta-csv", default=None, help="IMG_ID/AUTHOR/LAT/LON CSV in the npz's row order")
    ap.add_argument("--init", action="append", choices=["geoclip", "random"], help="location encoder init(s) to run")
    ap.add_argument("--gps-gallery", default=None, help="extra gallery points: CSV or 'geoclip'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--query-fraction", type=float, default=0.5)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a GalleryConfig field")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    meta, emb = load_npz(args.npz, args.meta_csv)
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    rows, results = [], {}
    for init in args.init or ["geoclip", "random"]:
        cfg = dataclasses.replace(GalleryConfig(), init=init, gps_gallery=args.gps_gallery, seed=args.seed, **overrides)
        r = evaluate(meta, emb, cfg, seed=args.seed, query_fraction=args.query_fraction,
                     log=print if args.verbose else (lambda *_: None))
        results[init] = r
        rows.append(markdown_row(f"gallery, init {init}" + (f", +{args.gps_gallery}" if args.gps_gallery else ""), r))
    prior = next(iter(results.values()))
    print(json.dumps(results, indent=1))
    print("| run | " + " | ".join(f"{t} km" for t in THRESHOLDS_KM) + " | median km |")
    print("|---|" + "---|" * (len(THRESHOLDS_KM) + 1))
    print(markdown_row("population prior", {"gallery": prior["prior"]}))
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
