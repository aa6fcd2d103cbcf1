"""One `geo finetune` run on fold 0 of the Im2GPS3k dev folds, on any device, for the GPU/CPU ratio.

    python benchmarks/gpu_finetune.py prepare --bundle /tmp/new-dev --out DATA_DIR
    python benchmarks/gpu_finetune.py run DATA_DIR OUT --device cpu|cuda
    python benchmarks/gpu_finetune.py sweep DATA_DIR OUT --device cuda

``prepare`` writes fold 0's gallery (the same photographer folds as benchmarks/eval_finetune.py: seed 0,
3 folds) with photos shrunk to 320 px, small enough to carry to a GPU machine. ``run`` fine-tunes the
offline lite0 on it with eval_finetune.py's settings (6 epochs, freeze_until blocks.3, lr 1e-4) and
prints the wall time of the run, its epochs' time and the held-out validation; the card goes to OUT.
``sweep`` runs settings around those (learning rate, frozen layers, label smoothing) and prints each one's
best held-out kNN score against the frozen backbone's: what a GPU makes cheap to try.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geo.finetune import FinetuneConfig, finetune  # noqa: E402


def prepare(bundle: str, out: Path) -> None:
    from PIL import Image, ImageOps

    from geo.core.splits import group_folds
    from geo.store.bundle import open_bundle
    from geo.store.embeddings import EmbeddingReader

    meta, _ = EmbeddingReader(open_bundle(bundle)).read()
    fold = group_folds(len(meta), meta["AUTHOR"].astype(str).to_numpy(), 3, 0)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for p, la, lo, a in meta.loc[fold != 0, ["path", "lat", "lon", "AUTHOR"]].itertuples(index=False):
        im = ImageOps.exif_transpose(Image.open(p)).convert("RGB")
        im.thumbnail((320, 320))
        im.save(out / Path(p).name, quality=90)
        rows.append((Path(p).name, la, lo, a))
    pd.DataFrame(rows, columns=["path", "lat", "lon", "AUTHOR"]).to_csv(out / "gallery.csv", index=False)
    print(f"{len(rows)} photos in {out}")


def run(data: Path, out: Path, device: str) -> None:
    cfg = FinetuneConfig(group_column="AUTHOR", epochs=6, freeze_until="blocks.3", lr=1e-4, seed=0,
                         image_root=str(data), device=device)
    t0 = time.perf_counter()
    card = finetune(str(data / "gallery.csv"), out / f"model-{device}", cfg, log=print)
    wall = time.perf_counter() - t0
    v = card["validation"]
    epochs = sum(h["seconds"] for h in v["history"])
    print(json.dumps({"device": device, "wall_s": round(wall, 1), "epochs_s": round(epochs, 1),
                      "threads": __import__("torch").get_num_threads(), "load": os.getloadavg(),
                      "base": v["base"], "best": v["best"],
                      "history": [{k: h[k] for k in ("epoch", "loss", "score", "seconds") if k in h}
                                  for h in v["history"]]}, default=float))
    (out / f"card-{device}.json").write_text(json.dumps(card, default=float, indent=1))


SWEEP = [  # (lr, freeze_until, epochs, smoothing_km): around eval_finetune.py's (1e-4, blocks.3, 6, 75)
    (1e-4, "blocks.3", 6, 75.0), (3e-5, "blocks.3", 10, 75.0), (1e-5, "blocks.3", 10, 75.0),
    (3e-5, "blocks.5", 10, 75.0), (3e-5, None, 10, 75.0), (3e-5, "blocks.3", 10, 250.0), (1e-5, None, 10, 250.0),
]


def sweep(data: Path, out: Path, device: str) -> None:
    """eval_finetune.py's run and settings around it, each scored by its best held-out kNN score."""
    for lr, freeze, epochs, tau in SWEEP:
        cfg = FinetuneConfig(group_column="AUTHOR", epochs=epochs, freeze_until=freeze, lr=lr, seed=0, patience=3,
                             smoothing_km=tau, image_root=str(data), device=device)
        t0 = time.perf_counter()
        card = finetune(str(data / "gallery.csv"), out / f"sweep-{lr}-{freeze}-{epochs}-{tau}", cfg, log=lambda m: None)
        v = card["validation"]
        print(json.dumps({"lr": lr, "freeze_until": freeze, "epochs": epochs, "smoothing_km": tau,
                          "wall_s": round(time.perf_counter() - t0, 1), "base": round(v["base"]["score"], 4),
                          "best": round(v["best"]["score"], 4), "best_epoch": v["best"]["epoch"],
                          "scores": [round(h["score"], 4) for h in v["history"]]}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--bundle", required=True)
    a.add_argument("--out", type=Path, required=True)
    for name in ("run", "sweep"):
        a = sub.add_parser(name)
        a.add_argument("data", type=Path)
        a.add_argument("out", type=Path)
        a.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(args.bundle, args.out)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (run if args.cmd == "run" else sweep)(args.data, args.out, args.device)


if __name__ == "__main__":
    main()
