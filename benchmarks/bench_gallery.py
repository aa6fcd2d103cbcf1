"""Gallery step latency: GeoCLIP's per-query re-encoding of its 100K gallery vs one FAISS search.

GeoCLIP's ``predict()`` needs CLIP from the hub for the image side, so what is
timed on its side is the part of ``predict()`` after the image features: its
own ``LocationEncoder`` over ``coordinates_100K.csv``, normalise, logits,
softmax, top-k — with a random 768-d CLIP feature put through its image MLP.
Our side is the same weights with the gallery encoded once: image projection +
one ``IndexFlatIP`` search (prior column zero, so both answer the same point).
Both run in this process, on this machine, one after the other::

    python benchmarks/bench_gallery.py [--queries 50] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from geo.models.location import ImageProjection, LocationEncoder, geoclip_gallery_csv
from geo.stages.gallery.stage import GpsGallery


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=50, help="single-image searches timed on our side")
    ap.add_argument("--geoclip-runs", type=int, default=1, help="GeoCLIP predict-step repetitions (~15 s each on 2 cores)")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--json", default=None, help="write the numbers here too")
    args = ap.parse_args(argv)

    import faiss
    from geoclip.model.location_encoder import LocationEncoder as RefEncoder
    from geoclip.model.misc import load_gps_data

    gallery = load_gps_data(str(geoclip_gallery_csv()))
    proj = ImageProjection.from_geoclip()
    scale = proj.logit_scale.exp()
    rng = np.random.default_rng(0)
    clip_feats = rng.standard_normal((max(args.queries, args.geoclip_runs), 768)).astype(np.float32)

    ref = RefEncoder().eval()
    geoclip_s, ref_top = [], []
    with torch.no_grad():
        for i in range(args.geoclip_runs):
            t0 = time.perf_counter()
            img = F.normalize(proj(torch.from_numpy(clip_feats[i:i + 1])), dim=1)
            loc = F.normalize(ref(gallery), dim=1)
            probs = (scale * img @ loc.T).softmax(dim=-1)
            top = torch.topk(probs, args.top_k, dim=1)
            geoclip_s.append(time.perf_counter() - t0)
            ref_top.append(int(top.indices[0, 0]))

    t0 = time.perf_counter()
    feats = LocationEncoder.from_geoclip().encode(gallery.numpy(), normalize=True)
    index = faiss.IndexFlatIP(feats.shape[1] + 1)
    index.add(np.hstack([feats, np.zeros((len(feats), 1), np.float32)]))
    build_s = time.perf_counter() - t0
    points = gallery.numpy().astype(np.float64)
    ours = GpsGallery(proj, index, points, np.full(len(points), "geoclip"), {})
    ours.search(clip_feats[:1], args.top_k)  # warm-up
    per_query = []
    for i in range(args.queries):
        t0 = time.perf_counter()
        latlon, _ = ours.search(clip_feats[i:i + 1], args.top_k)
        per_query.append(time.perf_counter() - t0)
    same = [bool(np.allclose(ours.search(clip_feats[i:i + 1], 1)[0][0, 0], points[ref_top[i]]))
            for i in range(args.geoclip_runs)]

    geoclip_med, ours_med = statistics.median(geoclip_s), statistics.median(per_query)
    out = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
                   f"{torch.get_num_threads()}, faiss {faiss.__version__}",
        "gallery_points": int(len(points)),
        "geoclip_predict_step_s": round(geoclip_med, 3),
        "ours_search_ms_median": round(1000 * ours_med, 3),
        "ours_search_ms_p90": round(1000 * float(np.quantile(per_query, 0.9)), 3),
        "speedup_x": round(geoclip_med / ours_med, 1),
        "one_time_gallery_encode_s": round(build_s, 2),
        "same_top1_as_geoclip": all(same),
    }
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
