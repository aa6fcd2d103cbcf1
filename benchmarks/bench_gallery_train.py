"""Gallery stage on 100 K synthetic 512-d embeddings: training time, and the gallery encoding after it.

    python benchmarks/bench_gallery_train.py [--n 100000 --dim 512 --epochs 40]

The embeddings are bench_cells.synthetic_gallery's (YFCC26k locations and authors, features tied to
location), so early stopping behaves as on a gallery with real signal. The bare baseline, timed in
the same run, is one pass of the location encoder and image projection over every photo's batch
(forward and backward, no queue, no validation): what one epoch must cost at the least.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_cells import synthetic_gallery  # noqa: E402

from geo.stages.gallery.stage import GalleryConfig, fit_gallery  # noqa: E402
from geo.stages.gallery.train import build_modules  # noqa: E402
from geo.store.bundle import Bundle  # noqa: E402


def bare_epoch_seconds(emb: np.ndarray, latlon: np.ndarray, config: GalleryConfig) -> float:
    """Forward + backward of both modules over all photos in training-sized batches, nothing else."""
    loc, proj = build_modules(config.train_config("synthetic", emb.shape[1]), emb.shape[1])
    params = [*loc.parameters(), *proj.parameters()]
    x, g = torch.from_numpy(emb), torch.from_numpy(latlon.astype(np.float32))
    t0 = time.perf_counter()
    for i in range(0, len(x), config.batch_size):
        img = torch.nn.functional.normalize(proj(x[i:i + config.batch_size]), dim=-1)
        gps = torch.nn.functional.normalize(loc(g[i:i + config.batch_size]), dim=-1)
        loss = -(img * gps).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)  # logit_scale is not in this loss
        del grads
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=GalleryConfig().epochs)
    args = ap.parse_args(argv)
    meta, emb = synthetic_gallery(args.n, args.dim)
    config = GalleryConfig(epochs=args.epochs)
    bare = bare_epoch_seconds(emb, meta[["lat", "lon"]].to_numpy(), config)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Bundle.create_or_resume(tmp, {"name": "synthetic"}, emb.shape[1])
        t0 = time.perf_counter()  # the whole stage as `geo build-index` runs it: fit, save, commit
        gallery = fit_gallery(meta, emb, config, bundle.manifest["backbone"]["name"], log=lambda *_: None)
        files, summary = gallery.save(bundle)
        bundle.commit("gallery", files, summary, replace=("gallery/",))
        total = time.perf_counter() - t0
    info = gallery.info
    epochs = info["train"]["epochs_run"]
    train = info["seconds"]["train"]
    print(json.dumps({"n": args.n, "dim": args.dim, "epochs_run": epochs, "best_epoch": info["train"].get("best_epoch"),
                      "seconds_total": round(total, 1), "seconds_train": train,
                      "seconds_encode_gallery": info["seconds"]["encode_gallery"], "gallery_points": info["n_points"],
                      "bare_epoch_seconds": round(bare, 2),
                      "train_epoch_over_bare_epoch": round(train / max(epochs, 1) / bare, 2)}, indent=1))


if __name__ == "__main__":
    main()
