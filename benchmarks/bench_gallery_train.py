"""Gallery stage time, where it goes, and its held-out accuracy.

    python benchmarks/bench_gallery_train.py --realistic /tmp/gal200k [--set location_lr=0 ...]
    python benchmarks/bench_gallery_train.py --round-cost 2560 2       # training rounds alone, random data
    python benchmarks/bench_gallery_train.py [--n 100000 --dim 512 --epochs 40]      # bench_cells' synthetic set

``--realistic DIR``: ``benchmarks/realistic.py``'s gallery.parquet and queries.parquet (queries by
photographers the gallery never saw). The stage runs as ``geo build-index`` runs it: the pipeline's
training sample (``train_photos``) with its held-out photographers (``VAL_FRACTION``, ``SPLIT_SEED``),
every photo's place for the points and the prior; then every query is answered with its best gallery
point (``--mode gallery``), % within each threshold. Times are wall and process CPU seconds with the
load average beside them: the training rounds, the per-round validation, the gallery's encoding, the rest.
The same script runs an older checkout's code (``PYTHONPATH=/old/tree``) for a before/after pair.

``--round-cost PHOTOS ROUNDS``: training rounds alone, with their losses and a weight checksum (two versions
that train alike print the same). Without either: bench_cells.synthetic_gallery's embeddings, and a bare baseline timed in the same
run (one forward + backward of both modules over every photo, no queue, no validation).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from geo.core.geodesy import THRESHOLDS_KM, haversine_km
from geo.core.splits import training_rows, validation_mask
from geo.pipeline import SPLIT_SEED, VAL_FRACTION
from geo.settings import StageConfigs
from geo.stages.gallery import stage as gallery_stage
from geo.stages.gallery import train as gallery_train
from geo.stages.gallery.stage import GalleryConfig, fit_gallery
from geo.stages.gallery.train import build_modules
from geo.store.bundle import Bundle


class Clock:
    """Wall and CPU seconds spent inside the wrapped functions, by name."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def wrap(self, owner, attr: str, name: str) -> None:
        inner = getattr(owner, attr)

        def timed(*a, **k):
            w, c = time.perf_counter(), time.process_time()
            try:
                return inner(*a, **k)
            finally:
                self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
                self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c
        setattr(owner, attr, timed)


def load_parquet(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    tab = pq.read_table(path)
    col = tab.column("embedding").combine_chunks()
    emb = col.values.to_numpy().reshape(len(tab), -1).astype(np.float32)
    return tab.drop(["embedding"]).to_pandas(), emb


def load() -> list[float]:
    return [float(x) for x in open("/proc/loadavg").read().split()[:3]]


def realistic(folder: Path, config: GalleryConfig) -> dict:
    """The stage as the pipeline runs it on a realistic testbed, timed by part; its answers to the queries."""
    meta_all, emb_all = load_parquet(folder / "gallery.parquet")
    qmeta, qemb = load_parquet(folder / "queries.parquet")
    held = validation_mask(len(meta_all), meta_all["AUTHOR"].astype(str).to_numpy(), VAL_FRACTION, SPLIT_SEED)
    rows = training_rows(len(meta_all), StageConfigs().train_photos, SPLIT_SEED)
    meta, emb = (meta_all, emb_all) if rows is None else (meta_all.iloc[rows].reset_index(drop=True), emb_all[rows])
    val = held if rows is None else held[rows]
    photos = meta_all[["lat", "lon"]].to_numpy(np.float64)
    del emb_all
    clock = Clock()
    clock.wrap(gallery_train._Contrastive, "round", "training rounds")
    clock.wrap(gallery_train._Validation, "score", "validation")
    clock.wrap(gallery_stage, "encode_points", "gallery encoding")
    load_before = load()
    w, c = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Bundle.create_or_resume(tmp, {"name": "synthetic-512"}, emb.shape[1])
        gallery = fit_gallery(meta, emb, config, "synthetic-512", log=lambda *_: None, val=val, photos=photos)
        files, summary = gallery.save(bundle)
        bundle.commit("gallery", files, summary, replace=("gallery/",))
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    latlon, _ = gallery.search(qemb, k=1)
    err = haversine_km(qmeta["lat"].to_numpy(), qmeta["lon"].to_numpy(), latlon[:, 0, 0], latlon[:, 0, 1])
    train = gallery.info["train"]
    parts = {k: [round(clock.wall[k], 1), round(clock.cpu[k], 1)] for k in clock.wall}
    parts["rest"] = [round(wall - sum(clock.wall.values()), 1), round(cpu - sum(clock.cpu.values()), 1)]
    return {"photos": len(meta_all), "train_sample": len(meta), "queries": len(qmeta),
            "stage_wall_s": round(wall, 1), "stage_cpu_s": round(cpu, 1), "parts_wall_cpu_s": parts,
            "load_before": load_before, "load_after": load(), "rounds": train.get("epochs_run"),
            "best_round": train.get("best_epoch"),
            "val_score": round(train.get("val", {}).get("score", float("nan")), 4),
            "accuracy": {f"{t}km": round(100 * float(np.mean(err <= t)), 1) for t in THRESHOLDS_KM},
            "median_km": round(float(np.median(err)), 1)}


def round_cost(photos: int, rounds: int, config: GalleryConfig) -> dict:
    """Training rounds alone (no validation) on random 512-d embeddings at random places: the per-step cost of the
    code on the path, and its losses and a weight checksum, so two versions' training can be compared exactly."""
    cfg = config.train_config("synthetic-512", 512)
    torch.manual_seed(cfg.seed)
    loc, proj = build_modules(cfg, 512)
    rng = np.random.default_rng(0)
    n = 2 * photos
    emb = rng.standard_normal((n, 512)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    latlon = np.stack([rng.uniform(-60, 70, n), rng.uniform(-180, 180, n)], 1)
    rows = (np.arange(n),) if "rows" in inspect.signature(gallery_train._Contrastive).parameters else ()  # before: none
    trainer = gallery_train._Contrastive(loc, proj, emb, *rows, latlon, cfg, torch.device("cpu"))
    load_before = load()
    w, c = time.perf_counter(), time.process_time()
    losses = [trainer.round(rng.permutation(n)[:photos]) for _ in range(rounds)]
    return {"photos_per_round": photos, "rounds": rounds, "wall_s": round(time.perf_counter() - w, 1),
            "cpu_s": round(time.process_time() - c, 1), "load_before": load_before, "load_after": load(),
            "losses": [round(x, 6) for x in losses], "weight_sum": float(proj.mlp[0].weight.detach().sum())}


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


def synthetic(n: int, dim: int, config: GalleryConfig) -> dict:
    from bench_cells import synthetic_gallery

    meta, emb = synthetic_gallery(n, dim)
    bare = bare_epoch_seconds(emb, meta[["lat", "lon"]].to_numpy(), config)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Bundle.create_or_resume(tmp, {"name": "synthetic"}, emb.shape[1])
        t0 = time.perf_counter()  # the whole stage as `geo build-index` runs it: fit, save, commit
        gallery = fit_gallery(meta, emb, config, bundle.manifest["backbone"]["name"], log=lambda *_: None)
        files, summary = gallery.save(bundle)
        bundle.commit("gallery", files, summary, replace=("gallery/",))
        total = time.perf_counter() - t0
    info = gallery.info
    epochs, train = info["train"]["epochs_run"], info["seconds"]["train"]
    return {"n": n, "dim": dim, "epochs_run": epochs, "best_epoch": info["train"].get("best_epoch"),
            "seconds_total": round(total, 1), "seconds_train": train,
            "seconds_encode_gallery": info["seconds"]["encode_gallery"], "gallery_points": info["n_points"],
            "bare_epoch_seconds": round(bare, 2), "train_epoch_over_bare_epoch": round(train / max(epochs, 1) / bare, 2)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--realistic", type=Path, default=None, help="folder with realistic.py's gallery/queries.parquet")
    ap.add_argument("--round-cost", type=int, nargs=2, default=None, metavar=("PHOTOS", "ROUNDS"),
                    help="time ROUNDS training rounds of PHOTOS photos alone (random data)")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=GalleryConfig().epochs, help="most training rounds")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a GalleryConfig field")
    ap.add_argument("--label", default="", help="a name for this run in the printed JSON")
    args = ap.parse_args(argv)
    config = dataclasses.replace(GalleryConfig(), epochs=args.epochs, **{k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)})
    if args.round_cost:
        out = round_cost(*args.round_cost, config)
    else:
        out = realistic(args.realistic, config) if args.realistic else synthetic(args.n, args.dim, config)
    print(json.dumps({"label": args.label, "code": gallery_train.__file__, "set": args.set, **out}),
          flush=True)


if __name__ == "__main__":
    main()
