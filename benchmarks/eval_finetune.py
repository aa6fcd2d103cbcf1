"""Frozen against fine-tuned backbone, every mode and the prior, on the Im2GPS3k dev sample split by photographer.

    python benchmarks/eval_finetune.py --frozen-bundle /tmp/dev-all --work /tmp/eval-ft --folds 3

For each fold the photographers (whole AUTHORs) are split into gallery and queries. Frozen: the gallery's
embeddings from the offline default backbone (the bundle built by `geo build-index` on the dev sample).
Fine-tuned: `geo finetune` on the gallery photos only (its own validation holds out gallery photographers),
then every photo embedded with the fine-tuned model. Both galleries get the real stages
(build_from_embeddings: FAISS, cells + heads, location encoder + GPS gallery, fusion) and the queries are
answered in every mode. The fold's fine-tuning runs are kept under --work and resumed when re-run.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from geo.core.geodesy import THRESHOLDS_KM, haversine_km
from geo.core.priors import population_prior
from geo.core.splits import group_folds
from geo.data.countries import countries_of
from geo.data.images import ImageDataset, collate_skip_errors
from geo.eval.metrics import label_accuracy
from geo.finetune import FinetuneConfig, finetune
from geo.models.backbones import load_backbone
from geo.pipeline import build_from_embeddings
from geo.settings import StageConfigs
from geo.query.index import GeoIndex
from geo.store.bundle import open_bundle
from geo.store.embeddings import EmbeddingReader

MODES = ("knn", "gallery", "cells", "regression", "fused")


def embed_all(model_dir: Path, paths: list[str], batch: int = 32) -> tuple[dict, np.ndarray]:
    bb = load_backbone(str(model_dir), device="auto")
    loader = torch.utils.data.DataLoader(ImageDataset(paths, bb.preprocess), batch_size=batch,
                                         collate_fn=collate_skip_errors, num_workers=2)
    out = np.zeros((len(paths), bb.dim), np.float32)
    for ok, x, errors in loader:  # indices are the dataset's
        if errors:
            raise RuntimeError(f"{[paths[i] for i, _ in errors]}: could not be read")
        out[ok] = bb.embed(x)
    return bb.spec(), out


def answers(spec: dict, meta, emb: np.ndarray, g: np.ndarray, q: np.ndarray) -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        index = GeoIndex(build_from_embeddings(tmp, spec, meta[g], emb[g], StageConfigs(), log=lambda *_: None))
        return {m: np.array([[a.lat, a.lon] for a in index.locate_embeddings(emb[q], mode=m)]) for m in MODES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frozen-bundle", required=True, help="geo build-index of the dev sample (default backbone)")
    ap.add_argument("--work", required=True, help="folder for the folds' fine-tuned models (resumed)")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--freeze-until", default="blocks.3")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    src = open_bundle(args.frozen_bundle)
    meta, frozen = EmbeddingReader(src).read()
    truth = meta[["lat", "lon"]].to_numpy(np.float64)
    authors = meta["AUTHOR"].astype(str).to_numpy()
    fold = group_folds(len(meta), authors, args.folds, args.seed)
    pred = {(kind, m): np.zeros((len(meta), 2)) for kind in ("frozen", "fine-tuned") for m in MODES}
    pred[("prior", "prior")] = np.zeros((len(meta), 2))
    per_fold, seconds = [], []
    work = Path(args.work)
    for f in range(args.folds):
        q, g = fold == f, fold != f
        manifest = work / f"fold{f}" / "gallery.csv"
        manifest.parent.mkdir(parents=True, exist_ok=True)
        meta[g][["path", "lat", "lon", "AUTHOR"]].to_csv(manifest, index=False)
        card = finetune(str(manifest), work / f"fold{f}" / "model",
                        FinetuneConfig(group_column="AUTHOR", epochs=args.epochs, freeze_until=args.freeze_until,
                                       lr=args.lr, seed=args.seed), log=print)
        seconds.append(sum(h["seconds"] for h in card["validation"]["history"]))  # over resumed runs too
        spec, tuned = embed_all(work / f"fold{f}" / "model", meta["path"].tolist())
        for kind, emb, sp in (("frozen", frozen, src.manifest["backbone"]), ("fine-tuned", tuned, spec)):
            for m, p in answers(sp, meta, emb, g, q).items():
                pred[(kind, m)][q] = p
        pred[("prior", "prior")][q] = population_prior(truth[g, 0], truth[g, 1])
        acc = {key: {t: float(np.mean(haversine_km(*pred[key][q].T, *truth[q].T) <= t)) for t in (200, 750, 2500)}
               for key in pred}
        acc.update({kind: acc[(kind, "fused")] for kind in ("frozen", "fine-tuned")})
        per_fold.append(acc)
        print(f"fold {f}: {int(g.sum())} gallery photos ({len(set(authors[g]))} photographers), {int(q.sum())} "
              f"queries; fine-tuning {seconds[-1]:.0f} s; fused frozen {acc['frozen']} fine-tuned {acc['fine-tuned']}")

    print(f"\nload average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; fine-tuning time per fold (probe and "
          f"epochs with their validation, decoding excluded) {', '.join(f'{s:.0f} s' for s in seconds)} "
          f"({torch.get_num_threads()} threads)")
    true_country = [c["name"] if c else None for c in countries_of(truth[:, 0], truth[:, 1])]
    print(f"\n| backbone | mode | {' | '.join(f'{t} km' for t in THRESHOLDS_KM)} | country | median km |")
    print("|---|---|" + "---|" * (len(THRESHOLDS_KM) + 2))
    for (kind, m), p in pred.items():
        e = haversine_km(p[:, 0], p[:, 1], truth[:, 0], truth[:, 1])
        country = label_accuracy(true_country, [c["name"] if c else None for c in countries_of(p[:, 0], p[:, 1])])
        print(f"| {kind} | {m} | " + " | ".join(f"{100 * np.mean(e <= t):.1f}" for t in THRESHOLDS_KM)
              + f" | {100 * country['acc']:.1f} | {np.median(e):.0f} |")
    print("\nfused, per fold (200 / 750 / 2500 km, percent): frozen -> fine-tuned")
    for f, acc in enumerate(per_fold):
        print(f"  fold {f}: " + "; ".join(f"{t} km {100 * acc['frozen'][t]:.1f} -> {100 * acc['fine-tuned'][t]:.1f}"
                                          for t in (200, 750, 2500)))
    print("\nthe single modes against the prior, per fold (200 / 750 / 2500 km, percent; frozen backbone)")
    for f, acc in enumerate(per_fold):
        print(f"  fold {f}: " + "; ".join(
            f"{m} " + "/".join(f"{100 * acc[key][t]:.1f}" for t in (200, 750, 2500))
            for m, key in (("prior", ("prior", "prior")), ("cells", ("frozen", "cells")),
                           ("gallery", ("frozen", "gallery")), ("regression", ("frozen", "regression")))))


if __name__ == "__main__":
    main()
