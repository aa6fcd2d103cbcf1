"""All four query modes and the population prior on the Im2GPS3k dev sample, split by photographer.

    geo build-index ../shared/data/im2gps3k-dev/im2gps3k_places365.csv \
        --image-root ../shared/data/im2gps3k-dev/images --out /tmp/dev-all
    python benchmarks/eval_dev.py --bundle /tmp/dev-all --folds 3

Embeddings come from the real build (offline default backbone). For each fold the
photographers are split (whole AUTHORs) into gallery and queries; a gallery bundle is
built from the gallery rows with the real stages (FAISS, cells + heads, location encoder
+ GPS gallery, fusion tuning on held-out gallery photographers), and the queries are
answered by GeoIndex.locate_embeddings in every mode. Pooled over folds, every photo is a
query exactly once.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from geo.bundle import Bundle, open_bundle
from geo.geodesy import haversine_km, pairwise_haversine_km
from geo.index_build.embed import write_shard
from geo.index_build.knn_index import build_knn_index
from geo.retrieval.fusion import CALIBRATED_KM, expected_calibration_error, reliability_table
from geo.retrieval.index import GeoIndex
from geo.splits import group_folds

THRESHOLDS = (1, 25, 200, 750, 2500)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gallery-init", default="geoclip", help="geoclip | random: the location encoder's start")
    args = ap.parse_args()

    from geo.cells.stage import CellsConfig, build_cells_stage
    from geo.gallery.stage import GalleryConfig, build_gallery_stage
    from geo.retrieval.fusion import tune_fusion_stage

    src = open_bundle(args.bundle)
    meta, emb = src.read_embeddings()
    truth = meta[["lat", "lon"]].to_numpy(np.float64)
    fold = group_folds(len(meta), meta["AUTHOR"].astype(str).to_numpy(), args.folds, args.seed)
    modes = ("knn", "gallery", "cells", "fused")
    pred = {m: np.zeros((len(meta), 2)) for m in (*modes, "prior")}
    p_within = {t: np.zeros(len(meta)) for t in CALIBRATED_KM}
    quiet = lambda *_: None  # noqa: E731
    for f in range(args.folds):
        q, g = fold == f, fold != f
        with tempfile.TemporaryDirectory() as tmp:
            b = Bundle.create_or_resume(Path(tmp) / "b", src.manifest["backbone"], emb.shape[1])
            gm = meta[g].reset_index(drop=True)
            write_shard(b, 0, gm, emb[g], {"failed": 0, "seconds": 0.0, "errors": []})
            s = b.embedding_shards()[0]
            b.register("embeddings", [s, s.with_suffix(".json")], {"ok": int(g.sum()), "failed": 0})
            b.manifest["counts"] = {"ok": int(g.sum()), "failed": 0}
            build_knn_index(b, log=quiet)
            build_cells_stage(b, gm, emb[g], CellsConfig(), log=quiet)
            build_gallery_stage(b, gm, emb[g], GalleryConfig(init=args.gallery_init), log=quiet)
            tune_fusion_stage(b, stage_options={"gallery": {"init": args.gallery_init}}, log=print)
            index = GeoIndex(b)
            for m in modes:
                ans = index.locate_embeddings(emb[q], mode=m)
                pred[m][q] = [[a["lat"], a["lon"]] for a in ans]
                if m == "fused":
                    for t in CALIBRATED_KM:
                        p_within[t][q] = [a["p_within"][t] for a in ans]
            d = pairwise_haversine_km(truth[g, 0], truth[g, 1], truth[g, 0], truth[g, 1])
            best = int(np.argmax((d <= 750).sum(axis=1)))
            pred["prior"][q] = truth[g][best]
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
