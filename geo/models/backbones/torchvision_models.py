"""torchvision classifiers; the embedding is the input of the last Linear layer."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from geo.data.images import Preprocess
from geo.models.registry import Backbone, BackboneError, register_backbone
from geo.models.weights import (
    file_weights,
    probe_dim,
    random_init,
    read_state_dict,
    seeded,
)


def _load_torchvision(spec: str, weights: str | None, cache_dir: str | None) -> Backbone:
    """Any torchvision classifier; the embedding is the input of its last Linear layer."""
    from torchvision.models import get_model, get_model_weights

    arch, _, tag = spec.partition("/")
    try:
        model = seeded(lambda: get_model(arch, weights=None))
        enum = get_model_weights(arch)
    except (ValueError, KeyError) as e:
        raise BackboneError(f"torchvision:{arch}: unknown model ({e})") from None
    entry = _torchvision_weights_entry(enum, tag, weights, arch)
    if weights:
        try:
            model.load_state_dict(read_state_dict(weights), strict=True)
        except RuntimeError as e:
            raise BackboneError(f"{weights}: does not fit torchvision:{arch} ({str(e).splitlines()[0]})") from None
        info = file_weights(weights)
    else:
        info = random_init(f"torchvision:{spec}")
    info["preprocess_from"] = f"{type(entry).__name__}.{entry.name}"
    _drop_last_linear(model, arch)
    t = entry.transforms()
    pre = Preprocess(size=int(t.crop_size[0]), resize=int(t.resize_size[0]), mean=tuple(t.mean), std=tuple(t.std),
                     interpolation=t.interpolation.value)
    return Backbone(f"torchvision:{spec}", probe_dim(model, pre.size), pre, model, info)


def _torchvision_weights_entry(enum: Any, tag: str, weights: str | None, arch: str) -> Any:
    """The weights enum entry whose preprocessing applies: named tag, else the file's published name, else DEFAULT."""
    if tag:
        try:
            return enum[tag]
        except KeyError:
            raise BackboneError(f"torchvision:{arch}: no weights tag {tag!r}; known: {[e.name for e in enum]}") from None
    if weights:
        for e in enum:
            if e.url.rsplit("/", 1)[-1] == Path(weights).name:
                return e
    return enum.DEFAULT


def _drop_last_linear(model: torch.nn.Module, arch: str) -> None:
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            last = name
    if last is None:
        raise BackboneError(f"torchvision:{arch}: no Linear classifier layer to remove")
    parent = model.get_submodule(last.rsplit(".", 1)[0]) if "." in last else model
    setattr(parent, last.rsplit(".", 1)[-1], torch.nn.Identity())


register_backbone("torchvision", _load_torchvision,
                  "torchvision:<model>[/<WEIGHTS_TAG>] with weights=<file>; input of the last Linear layer")
