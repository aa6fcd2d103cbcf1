"""What a run leaves for ``geo build-index --backbone MODEL_DIR``: ``model.safetensors`` and the card.

``model.safetensors`` is the base network's state dict (every tensor, heads excluded), rewritten whenever an
epoch beats the best held-out score, so it always holds the epoch the card names. ``geo-model.json`` (format
``geo-finetuned-model``, read back by geo.models.backbones.finetuned) says how to rebuild the network (base,
its weights, preprocessing, dim), which weights to load (with their sha256) and how they were made: the
training photos, the settings and every epoch's validation, so a model is never a bare file of numbers.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geo.finetune.checkpoint import Progress
from geo.finetune.config import FinetuneConfig
from geo.finetune.data import TrainingData
from geo.models.backbones import Backbone
from geo.models.backbones.finetuned import CARD_FORMAT
from geo.models.registry import MODEL_CARD
from geo.models.weights import file_sha256
from geo.store.atomic import atomic_save_safetensors, atomic_write_json

WEIGHTS = "model.safetensors"


def save_weights(out: Path, model: torch.nn.Module) -> None:
    """The backbone as it is now becomes the model's weights (the best epoch so far)."""
    atomic_save_safetensors(out / WEIGHTS, model.state_dict())


def write_card(out: Path, cfg: FinetuneConfig, bb: Backbone, data: TrainingData, trainable: int,
               progress: Progress, device: torch.device) -> dict[str, Any]:
    """Write ``out/geo-model.json`` for the weights already in ``out/model.safetensors``; returns the card."""
    photos = data.photos
    card = {
        "format": CARD_FORMAT, "version": 1, "base": cfg.backbone, "base_weights": bb.weights,
        "dim": bb.dim, "preprocess": bb.preprocess.to_dict(), "weights": WEIGHTS,
        "weights_sha256": file_sha256(out / WEIGHTS),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "training": {"manifest": photos.source, "photos": len(photos.df), "train": int(len(data.train)),
                     "validation": int(len(data.val)), "failed": len(data.failed), "group_column": photos.group_column,
                     "photographers": int(len(np.unique(photos.groups))) if photos.groups is not None else None,
                     "cells": {p.name: p.n_cells for p in data.parts}, "trainable_parameters": trainable,
                     "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "device"},
                     "device": str(device)},
        "validation": {"best_epoch": progress.best_epoch, "best": progress.history[progress.best_epoch],
                       "base": progress.history[0], "history": progress.history},
    }
    atomic_write_json(out / MODEL_CARD, card)
    return card
