"""Each epoch ends in a checkpoint, so an interrupted run resumes where it stopped and ends in the state an
uninterrupted one would have reached (data order and augmentation are seeded per epoch).

``checkpoint/state.safetensors`` holds the weights, the heads and AdamW's moments as one flat tensor dict
(safetensors: nothing is pickled); ``checkpoint/state.json`` the epochs' history, the best so far and the
run's fingerprint (:meth:`FinetuneConfig.fingerprint` of the photos), which a resume must match: a MODEL_DIR
holding another run's checkpoint is refused rather than continued with other photos or settings.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from geo.data.manifest import ManifestError
from geo.finetune.trainer import Trainer
from geo.store.atomic import atomic_save_safetensors, atomic_write_json


@dataclass
class Progress:
    """Where a run stands: every finished epoch's scores (``history[0]`` is epoch 0, the probe), the best
    held-out score and its epoch, and how many epochs since it improved (early stopping)."""
    history: list[dict[str, float]] = field(default_factory=list)
    best: float = -math.inf
    best_epoch: int = -1
    waited: int = 0

    @property
    def next_epoch(self) -> int:
        return len(self.history)

    def record(self, epoch: int, scores: dict[str, float], seconds: float) -> bool:
        """Add an epoch's scores; True when it beats the best by more than noise (1e-4), i.e. its weights are kept."""
        self.history.append({"epoch": epoch, **scores, "seconds": round(seconds, 1)})
        if scores["score"] > self.best + 1e-4:
            self.best, self.best_epoch, self.waited = scores["score"], epoch, 0
            return True
        self.waited += 1
        return False


def trainer_state(t: Trainer) -> dict[str, torch.Tensor]:
    """Weights, heads and AdamW moments as one flat tensor dict."""
    out = {f"model.{k}": v for k, v in t.model.state_dict().items()}
    out.update({f"heads.{k}": v for k, v in t.heads.state_dict().items()})
    for i, p in enumerate(q for g in t.opt.param_groups for q in g["params"]):
        st = t.opt.state.get(p)
        if st:
            out.update({f"opt.{i}.exp_avg": st["exp_avg"], f"opt.{i}.exp_avg_sq": st["exp_avg_sq"],
                        f"opt.{i}.step": torch.as_tensor(st["step"], dtype=torch.float64).reshape(1)})
    return out


def restore_trainer(state: dict[str, torch.Tensor], t: Trainer) -> None:
    """The inverse of :func:`trainer_state`. A checkpoint loads on the CPU: each AdamW moment is moved to its
    parameter's device (else the first step on CUDA fails on mixed devices); AdamW keeps ``step`` on the CPU."""
    t.model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
    t.heads.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("heads.")})
    for i, p in enumerate(q for g in t.opt.param_groups for q in g["params"]):
        if f"opt.{i}.exp_avg" in state:
            t.opt.state[p] = {"step": torch.tensor(float(state[f"opt.{i}.step"][0])),
                              "exp_avg": state[f"opt.{i}.exp_avg"].to(p.device, copy=True),
                              "exp_avg_sq": state[f"opt.{i}.exp_avg_sq"].to(p.device, copy=True)}


class Checkpoint:
    """``out/checkpoint/``: the last finished epoch of the run whose fingerprint is ``fingerprint``."""

    def __init__(self, out: Path, fingerprint: str):
        self.out, self.fingerprint = out, fingerprint
        self.json, self.state = out / "checkpoint" / "state.json", out / "checkpoint" / "state.safetensors"

    def resume(self, trainer: Trainer) -> Progress:
        """The progress of an earlier run of this fingerprint, with ``trainer`` restored to its last epoch; a
        fresh :class:`Progress` when there is none. Another run's checkpoint is a ManifestError."""
        if not self.json.exists():
            return Progress()
        ck = json.loads(self.json.read_text())
        if ck.get("fingerprint") != self.fingerprint:
            raise ManifestError(f"{self.out}: holds a checkpoint of another run (other photos or settings); "
                                "choose another --out or delete it")
        restore_trainer(load_file(str(self.state)), trainer)
        return Progress(ck["history"], ck["best"], ck["best_epoch"], ck["waited"])

    def remove(self) -> None:
        """Drop ``out/checkpoint/`` once the card and weights are written: MODEL_DIR is what a user copies and
        builds with, and the optimiser's moments doubled its size (40 MB of 60 here) for nothing after the run."""
        shutil.rmtree(self.out / "checkpoint", ignore_errors=True)

    def save(self, trainer: Trainer, progress: Progress) -> None:
        """Both files atomically (temp file + rename): a run killed mid-write leaves the previous epoch's."""
        atomic_save_safetensors(self.state, trainer_state(trainer))
        atomic_write_json(self.json, {"fingerprint": self.fingerprint, **asdict(progress)})
