"""What a fine-tuning run is told: :class:`FinetuneConfig`, its resume fingerprint, and the ``--config`` file.

Why a file and not an option per setting: the learning rate, label smoothing, loss weights, patience and the
like are tuned constants, data the way timm's pretrained configs are (benchmarks/RESULTS.md has the runs and
a sweep around them). ``geo finetune`` keeps the options a user changes per run; anything else is
set, rarely, in one JSON or TOML file whose keys are this dataclass's fields, checked before a photo is read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geo.core.settings_file import read_settings_file, unknown_setting

PARTITIONERS = ("adaptive", "semantic")  # bottomup ranks cells by embeddings, which change while fine-tuning


@dataclass(frozen=True)
class FinetuneConfig:
    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    image_root: str | None = None
    group_column: str | None = None
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-4  # the backbone's; the new heads learn 10x faster
    weight_decay: float = 1e-4
    freeze_until: str | None = None  # parameters before the first whose name starts with this stay fixed
    smoothing_km: float = 75.0  # PIGEON's tau for haversine label smoothing
    partitioner: str = "adaptive"  # the cells the heads classify into: adaptive (S2) | semantic (PIGEON)
    regression_weight: float = 0.0
    contrastive_weight: float = 0.0  # GeoCLIP's image-to-GPS InfoNCE against its frozen location encoder
    augment: bool = True
    patience: int = 2
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"

    def fingerprint(self, manifest_digest: str) -> str:
        """What must match for a checkpoint to be resumed (epochs and patience may change). Settings at their
        defaults are left out, so an option added later with a neutral default keeps old checkpoints valid."""
        defaults = FinetuneConfig()
        keep = {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("epochs", "patience", "device") and v != getattr(defaults, k)}
        return hashlib.sha256(json.dumps([keep, manifest_digest], sort_keys=True).encode()).hexdigest()[:16]

    def problems(self) -> list[str]:
        """Every setting out of its range, as ``name: why``; checked before the run reads a photo, so a typo in a
        config file fails in a second, not after the decode."""
        out = [f"{k} must be at least 1, not {getattr(self, k)}"
               for k in ("epochs", "batch_size", "patience") if getattr(self, k) < 1]
        out += [f"{k} must be positive, not {getattr(self, k)}"
                for k in ("lr", "smoothing_km") if not getattr(self, k) > 0]
        out += [f"{k} must not be negative, not {getattr(self, k)}"
                for k in ("weight_decay", "regression_weight", "contrastive_weight") if not getattr(self, k) >= 0]
        if not 0 < self.val_fraction < 1:
            out.append(f"val_fraction must be between 0 and 1, not {self.val_fraction}")
        if self.partitioner not in PARTITIONERS:
            out.append(f"partitioner takes {' or '.join(PARTITIONERS)}, not {self.partitioner!r} (bottomup ranks "
                       "cells by embeddings, which change while fine-tuning)")
        return out


_FIELD_TYPES = typing.get_type_hints(FinetuneConfig)


def _typed(path: Path, key: str, value: Any) -> Any:
    """``value`` as field ``key``'s type, or a ValueError naming the file and the key; an int is taken for a
    float (``lr = 1``), nothing else is converted."""
    hint = _FIELD_TYPES[key]
    optional = type(None) in typing.get_args(hint)
    if value is None and optional:
        return None
    kind = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ValueError(f"{path}: {key} must be {kind.__name__}{' or null' if optional else ''}, not {value!r}")


def read_config(path: str | Path, base: FinetuneConfig = FinetuneConfig()) -> FinetuneConfig:
    """``base`` with the settings of a JSON or TOML file (``.toml``: TOML, anything else: JSON) whose keys are
    :class:`FinetuneConfig`'s fields. An unknown key, a wrong type or a value out of range is a ValueError that
    names the file and the key, so a misspelt setting never silently falls back to its default."""
    path = Path(path)
    values = read_settings_file(path)
    for key in values:
        if key not in _FIELD_TYPES:
            raise ValueError(unknown_setting(path, key, list(_FIELD_TYPES)))
    cfg = dataclasses.replace(base, **{k: _typed(path, k, v) for k, v in values.items()})
    if bad := cfg.problems():
        raise ValueError(f"{path}: {bad[0]}")
    return cfg
