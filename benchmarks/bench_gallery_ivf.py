"""The GPS gallery at its largest, exact against the IVF index geo builds above ``EXACT_POINTS``: search time,
recall of the exact top-32, and the answers and accuracy of the fused and gallery modes.

    python benchmarks/realistic.py --photos 12000 --queries 1500 --dim 512 --out /tmp/r12k
    geo build-index --embeddings /tmp/r12k/gallery.parquet --backbone synthetic-512 --group AUTHOR --out /tmp/r12k/B
    python benchmarks/bench_gallery_ivf.py --index /tmp/r12k/B --queries /tmp/r12k/queries.parquet \
        --photos /tmp/r12k/gallery.parquet

A testbed of real size has ~10K gallery points, under ``EXACT_POINTS``: the bundle's own location encoder and
image projection are used over GeoCLIP's 100K GPS gallery plus the testbed's places (what ``--gps-gallery
geoclip`` gives), indexed as ``gallery_index`` does, and the same vectors exactly. The bundle's fusion was tuned
with its own gallery, so the accuracies compare the two searches with each other, not with the bundle's.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq

from geo.core.geodesy import THRESHOLDS_KM, haversine_km
from geo.query.index import open_index
from geo.stages.gallery.stage import GalleryConfig, GpsGallery, encode_points, gallery_points, index_info


def _table(path: str, *cols: str) -> list[np.ndarray]:
    t = pq.read_table(path, columns=list(cols))
    return [np.stack(t.column(c).to_numpy(zero_copy_only=False)) if c == "embedding" else t.column(c).to_numpy()
            for c in cols]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", required=True)
    ap.add_argument("--queries", required=True, help="query embeddings with lat, lon (realistic.py's queries)")
    ap.add_argument("--photos", required=True, help="the gallery's embeddings table (its lat, lon are read)")
    ap.add_argument("--k", type=int, default=32)
    args = ap.parse_args()
    faiss.omp_set_num_threads(1)  # one query at a time, as geo query and the server's model threads search
    emb, lat, lon = _table(args.queries, "embedding", "lat", "lon")
    emb, truth = emb.astype(np.float32), np.stack([lat, lon], 1)
    idx = open_index(Path(args.index))
    gal = idx.gallery
    full = GpsGallery.load(idx.bundle, with_location_encoder=True)
    photos = np.stack(_table(args.photos, "lat", "lon"), 1)
    fields = {f.name for f in dataclasses.fields(GalleryConfig)}
    config = GalleryConfig(**{k: v for k, v in gal.info["config"].items() if k in fields})
    points, sources = gallery_points(photos, "geoclip", config.max_points, config.seed)
    t0 = time.perf_counter()
    ivf = encode_points(full.location_encoder, full.projection, points, photos, config)
    print(f"{len(points):,} points, {index_info(ivf)}, encoded and indexed in {time.perf_counter() - t0:.1f} s")
    flat = faiss.IndexFlatIP(ivf.d)
    flat.add(ivf.reconstruct_n(0, ivf.ntotal))
    gal.points, gal.sources = points, sources
    q = np.hstack([gal.projection.encode(emb, normalize=True), np.ones((len(emb), 1), np.float32)])
    exact = flat.search(q, args.k)[1]
    answers = {}
    for name, index in (("flat", flat), ("ivf", ivf)):
        gal.index = index
        got = index.search(q, args.k)[1]
        recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(got, exact)])
        t0 = time.perf_counter()
        for i in range(300):
            index.search(q[i % len(q):i % len(q) + 1], args.k)
        ms = 1000 * (time.perf_counter() - t0) / 300
        print(f"{name}: {ms:.2f} ms a search, recall@{args.k} {recall:.4f}, top-1 {np.mean(got[:, 0] == exact[:, 0]):.4f}")
        for mode in ("fused", "gallery"):
            ans = np.array([(a.lat, a.lon) for s in range(0, len(emb), 100)
                            for a in idx.locate_embeddings(emb[s:s + 100], mode=mode)])
            answers[name, mode] = ans
            km = haversine_km(truth[:, 0], truth[:, 1], ans[:, 0], ans[:, 1])
            print(f"  {mode:8s}" + "  ".join(f"{t} km {100 * np.mean(km <= t):.2f}%" for t in THRESHOLDS_KM))
    for mode in ("fused", "gallery"):
        a, b = answers["flat", mode], answers["ivf", mode]
        same = np.mean(haversine_km(a[:, 0], a[:, 1], b[:, 0], b[:, 1]) < 1e-6)
        print(f"{mode}: the same answer for {100 * same:.1f}% of {len(a)} photos")


if __name__ == "__main__":
    main()
