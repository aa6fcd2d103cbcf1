"""All four query modes and the population prior on the Im2GPS3k dev sample, split by photographer.

    geo build-index ../shared/data/im2gps3k-dev/im2gps3k_places365.csv \
        --image-root ../shared/data/im2gps3k-dev/images --out /tmp/dev-all
    python benchmarks/eval_dev.py --bundle /tmp/dev-all --folds 3

Embeddings come from the real build (offline default backbone). For each fold the
photographers are split (whole AUTHORs) into gallery and queries; a gallery bundle is
built from the gallery rows with the real stages (FAISS, cells + heads, location encoder
+ GPS gallery, fusion fitted out of fold on the gallery's own photographers), and the queries are
answered by GeoIndex.locate_embeddings in every mode. Pooled over folds, every photo is a
query exactly once.
"""
from __future__ import annotations

import argparse
import tempfile

import numpy as np

from geo.core.geodesy import THRESHOLDS_KM as THRESHOLDS
from geo.core.geodesy import haversine_km
from geo.core.priors import population_prior
from geo.core.splits import group_folds
from geo.pipeline import build_from_embeddings
from geo.settings import StageConfigs
from geo.query.index import GeoIndex
from geo.stages.fusion.calibration import (
    CALIBRATED_KM,
    expected_calibration_error,
    reliability_table,
)
from geo.stages.gallery.stage import GalleryConfig
from geo.store.bundle import open_bundle
from geo.store.embeddings import EmbeddingReader


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gallery-init", default="geoclip", help="geoclip | random: the location encoder's start")
    args = ap.parse_args()

    src = open_bundle(args.bundle)
    meta, emb = EmbeddingReader(src).read()
    truth = meta[["lat", "lon"]].to_numpy(np.float64)
    fold = group_folds(len(meta), meta["AUTHOR"].astype(str).to_numpy(), args.folds, args.seed)
    modes = ("knn", "gallery", "cells", "fused")
    pred = {m: np.zeros((len(meta), 2)) for m in (*modes, "prior")}
    p_within = {t: np.zeros(len(meta)) for t in CALIBRATED_KM}
    configs = StageConfigs(gallery=GalleryConfig(init=args.gallery_init))
    for f in range(args.folds):
        q, g = fold == f, fold != f
        with tempfile.TemporaryDirectory() as tmp:
            b = build_from_embeddings(tmp, src.manifest["backbone"], meta[g], emb[g], configs, log=print)
            index = GeoIndex(b)
            for m in modes:
                ans = index.locate_embeddings(emb[q], mode=m)
                pred[m][q] = [[a.lat, a.lon] for a in ans]
                if m == "fused":
                    for t in CALIBRATED_KM:
                        p_within[t][q] = [a.p_within[t] for a in ans]
            pred["prior"][q] = population_prior(truth[g, 0], truth[g, 1])
        print(f"fold {f}: {int(g.sum())} gallery photos, {int(q.sum())} queries")
    print(f"\n| answer | {' | '.join(f'{t} km' for t in THRESHOLDS)} | median km |")
    print("|---|" + "---|" * (len(THRESHOLDS) + 1))
    for m, p in pred.items():
        e = haversine_km(p[:, 0], p[:, 1], truth[:, 0], truth[:, 1])
        print(f"| {m} | " + " | ".join(f"{100 * np.mean(e <= t):.1f}" for t in THRESHOLDS) + f" | {np.median(e):.0f} |")
    e = haversine_km(pred["fused"][:, 0], pred["fused"][:, 1], truth[:, 0], truth[:, 1])
    print("\nfused p_within reliability (predicted vs observed share within the radius):")
    for t in CALIBRATED_KM:
        hit = e <= float(t)
        print(f"  {t} km: ECE {expected_calibration_error(p_within[t], hit):.3f}; "
              + "; ".join(f"{r['bin']}: n={r['n']} pred {r['predicted']:.2f} obs {r['observed']:.2f}"
                          for r in reliability_table(p_within[t], hit)))


if __name__ == "__main__":
    main()
