"""One fine-tuning run from start to card: the order of the roles, and what the user is told along the way.

read_photos (split by photographer) -> load the base -> prepare (pixels, cells) -> Trainer -> resume from the
checkpoint, or epoch 0, the linear probe (LP-FT) -> epochs until ``cfg.epochs`` or ``cfg.patience`` epochs
without a better held-out score, each checkpointed -> the card (and the checkpoint removed).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from geo.core.progress import detail
from geo.core.runtime import resolve_device
from geo.finetune.card import save_weights, write_card
from geo.finetune.checkpoint import Checkpoint, Progress
from geo.finetune.config import FinetuneConfig
from geo.finetune.data import Log, Photos, prepare, read_photos
from geo.finetune.trainer import SCORED_KM, Trainer
from geo.models.backbones import Backbone, BackboneError, load_backbone


def _load_base(cfg: FinetuneConfig, photos: Photos, log: Log) -> Backbone:
    """The network to start from, on the CPU in fp32 (the trainer moves it); it must be a torch module."""
    bb = load_backbone(cfg.backbone, device="cpu", precision="fp32", weights=cfg.weights)
    if not isinstance(bb.model, torch.nn.Module):
        raise BackboneError(f"{cfg.backbone}: not a torch module; it cannot be fine-tuned")
    held, col = photos.held, photos.group_column
    log(f"finetune: {len(photos.df):,} photos ({(~held).sum():,} train, {held.sum():,} validation"
        f"{f', whole {col} groups' if col else ', at random: no photographer column'}); base {bb.name}")
    return bb


def _probe(trainer: Trainer, progress: Progress, out: Path, log: Log) -> None:
    """Epoch 0: the heads alone on frozen features (a linear probe), scored like any epoch; the frozen backbone
    is the first best, so a run that never improves on it keeps the base weights."""
    t0 = time.perf_counter()
    trainer.probe()
    progress.record(0, trainer.validate(), time.perf_counter() - t0)
    save_weights(out, trainer.model)
    h = progress.history[0]
    log(f"finetune: the frozen backbone: held-out kNN median {h['knn_median_km']:.0f} km, score "
        f"{progress.best:.4f} (heads' loss {h['loss']:.3f}); {trainer.trainable:,} parameters to fine-tune")


def _epochs(trainer: Trainer, checkpoint: Checkpoint, progress: Progress, out: Path, log: Log) -> None:
    """Train from ``progress.next_epoch`` until the last epoch or early stopping; the best epoch's weights are
    written as they appear and every epoch ends in a checkpoint."""
    cfg = trainer.cfg
    for epoch in range(progress.next_epoch, cfg.epochs + 1):
        if progress.waited >= cfg.patience:
            break
        t0 = time.perf_counter()
        trainer.train_epoch(epoch)
        scores = trainer.validate()
        if progress.record(epoch, scores, time.perf_counter() - t0):
            save_weights(out, trainer.model)
        checkpoint.save(trainer, progress)
        log(f"finetune: epoch {epoch}: held-out kNN median {scores['knn_median_km']:.0f} km, "
            + " ".join(f"{t} km {scores[f'knn_acc_{t}km']:.1%}" for t in SCORED_KM)
            + f", loss {scores['loss']:.3f} ({progress.history[-1]['seconds']:.0f} s)"
            + ("  best" if progress.best_epoch == epoch else f"  no better for {progress.waited}"))
        detail(log, json.dumps(progress.history[-1]))
    if progress.waited >= cfg.patience:
        log(f"finetune: stopped early: no better held-out score for {progress.waited} epochs")


def finetune(manifest: str, out: str | Path, cfg: FinetuneConfig = FinetuneConfig(), log: Log = print) -> dict[str, Any]:
    """Fine-tune ``cfg.backbone`` on the manifest's photos into ``out`` (MODEL_DIR); returns the card. A settings
    problem is a ValueError before anything is read; an ``out`` holding this run's checkpoint (an interrupted run)
    resumes it, and a finished run removes it."""
    if bad := cfg.problems():
        raise ValueError("; ".join(bad))
    out = Path(out)
    photos = read_photos(manifest, cfg)
    device = resolve_device(cfg.device)
    bb = _load_base(cfg, photos, log)
    data = prepare(photos, bb, cfg, log)
    trainer = Trainer(bb, data, cfg, device)
    checkpoint = Checkpoint(out, cfg.fingerprint(photos.digest()))
    progress = checkpoint.resume(trainer)
    if progress.history:
        log(f"finetune: resumed after epoch {progress.next_epoch - 1} (best held-out score {progress.best:.4f} "
            f"at epoch {progress.best_epoch})")
    else:
        _probe(trainer, progress, out, log)
    _epochs(trainer, checkpoint, progress, out, log)
    card = write_card(out, cfg, bb, data, trainer.trainable, progress, device)
    checkpoint.remove()  # the run is whole: MODEL_DIR keeps the card and the weights only
    return card
