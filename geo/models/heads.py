"""Cell classification heads: one linear head per partition over a shared input, saved as safetensors.

Training lives in :mod:`geo.stages.cells.train`. When a scene column is given, the heads see the scene as extra one-hot
inputs (true labels in training) and a scene head learns to predict it, so
a query without a label is conditioned on the predicted scene probabilities.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from geo.core.runtime import NUMPY_ROWS, resolve_device
from geo.models.numpy_eval import numpy_forward, softmax_rows
from geo.store.atomic import atomic_save_safetensors, atomic_write_json
from geo.store.bundle import BundleError
from geo.store.schema import read_checked

HEAD_KINDS = ("linear", "mlp")


class CellHeads(nn.Module):
    """Shared input (linear: the embedding itself; mlp: one hidden layer) -> one linear head per partition."""

    def __init__(self, dim: int, n_classes: list[int], head: str = "linear", hidden: int = 512,
                 dropout: float = 0.2, n_scenes: int = 0):
        super().__init__()
        if head not in HEAD_KINDS:
            raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEAD_KINDS)}")
        self.spec = {"dim": dim, "n_classes": list(n_classes), "head": head, "hidden": hidden,
                     "dropout": dropout, "n_scenes": n_scenes}
        width = dim + n_scenes
        if head == "mlp":
            self.trunk = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout))
            width = hidden
        else:
            self.trunk = nn.Dropout(dropout)
        self.heads = nn.ModuleList(nn.Linear(width, c) for c in n_classes)
        self.scene_head = nn.Linear(dim, n_scenes) if n_scenes else None

    def forward(self, x: torch.Tensor, scene: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Logits per partition, and scene logits; ``scene`` (probabilities [n, n_scenes]) defaults to the predicted ones."""
        scene_logits = self.scene_head(x) if self.scene_head is not None else None
        if scene_logits is not None:
            x = torch.cat([x, scene if scene is not None else scene_logits.softmax(-1)], dim=1)
        h = self.trunk(x)
        return [head(h) for head in self.heads], scene_logits


def head_logits(model: CellHeads, emb: np.ndarray, scene: np.ndarray | None = None,
                batch: int = 8192) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Logits per partition (float32 [n, cells]) and scene probabilities, in batches: the eval-mode forward.
    A warm query's one row (:data:`~geo.core.runtime.NUMPY_ROWS`) on the CPU runs in numpy
    (:mod:`geo.models.numpy_eval`); batches run through the module.

    ``scene``: int [n], -1 where unknown (the scene head's prediction is used there).
    """
    if len(emb) == NUMPY_ROWS and model.heads[0].weight.is_cpu:  # not next(model.parameters()): 18 µs a query
        return _numpy_logits(model, np.asarray(emb, dtype=np.float32),
                             None if scene is None else np.asarray(scene, dtype=np.int64))
    return _torch_logits(model, emb, scene, batch)


@torch.no_grad()
def _torch_logits(model: CellHeads, emb: np.ndarray, scene: np.ndarray | None,
                  batch: int) -> tuple[list[np.ndarray], np.ndarray | None]:
    dev = model.heads[0].weight.device
    n_scenes = model.spec["n_scenes"]
    outs: list[list[np.ndarray]] = [[] for _ in model.heads]
    scenes = []
    for b in range(0, len(emb), batch):
        x = torch.from_numpy(np.ascontiguousarray(emb[b:b + batch], dtype=np.float32)).to(dev)
        scene_in = None
        if n_scenes:
            pred = model.scene_head(x).softmax(-1)
            if scene is not None:
                sb = torch.from_numpy(np.asarray(scene[b:b + batch], dtype=np.int64)).to(dev)
                known = sb >= 0
                pred[known] = nn.functional.one_hot(sb[known], n_scenes).float()
            scene_in = pred
            scenes.append(pred.cpu().numpy())
        logits, _ = model(x, scene_in)
        for p, z in enumerate(logits):
            outs[p].append(z.float().cpu().numpy())
    return [np.concatenate(o) for o in outs], (np.concatenate(scenes) if scenes else None)


def _numpy_logits(model: CellHeads, x: np.ndarray, scene: np.ndarray | None) -> tuple[list[np.ndarray], np.ndarray | None]:
    n_scenes = model.spec["n_scenes"]
    scene_in = None
    if n_scenes:
        scene_in = softmax_rows(numpy_forward(model.scene_head, x))
        if scene is not None:
            known = scene >= 0
            scene_in[known] = np.eye(n_scenes, dtype=np.float32)[scene[known]]
        x = np.concatenate([x, scene_in], axis=1)
    h = numpy_forward(model.trunk, x)
    return [numpy_forward(head, h) for head in model.heads], scene_in


def save_heads(model: CellHeads, weights: Path, config_path: Path, extra: dict) -> None:
    """Weights as safetensors, everything needed to rebuild and use them as JSON."""
    atomic_save_safetensors(weights, dict(model.state_dict()), metadata={"format": "geo-cell-heads"})
    atomic_write_json(config_path, {"model": model.spec, **extra})


# what load_heads reads of a heads config; the cells and the city head check their own keys beside it
HEADS_SCHEMA = {"model": {"dim": int, "n_classes": [int], "head": str, "hidden": int, "dropout": float,
                          "n_scenes": int}}


def load_heads(weights: Path, config_path: Path, device: str = "cpu") -> tuple[CellHeads, dict]:
    from safetensors.torch import load_file

    cfg = read_checked(config_path, HEADS_SCHEMA)
    try:
        spec = cfg["model"]
        model = CellHeads(spec["dim"], spec["n_classes"], spec["head"], spec["hidden"], spec["dropout"], spec["n_scenes"])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{config_path}: not a cell-heads config ({e})") from None
    try:
        model.load_state_dict(load_file(str(weights)))
    except (RuntimeError, OSError) as e:
        raise BundleError(f"{weights}: weights do not match {config_path.name} ({e})") from None
    return model.to(resolve_device(device)).eval(), cfg


