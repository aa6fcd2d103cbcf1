"""The ``geoclip`` backbone preset: CLIP ViT-L/14 image features through GeoCLIP's image MLP.

GeoCLIP embeds an image as ``mlp(CLIP.get_image_features(x))`` with HF
transformers' CLIP; open_clip's ``ViT-L-14`` ``encode_image`` is the same
768-d projected feature for the same weights, so the CLIP side loads through
the ``open_clip`` backbone (hub tag, ``hf-hub:`` or ``local-dir:``) and this
module adds GeoCLIP's MLP. The resulting 512-d embeddings live in GeoCLIP's
location-feature space: the gallery stage then starts from an identity
projection and GeoCLIP's 100K gallery, i.e. GeoCLIP's own answer, with kNN and
cell priors available on the same embeddings.

Names::

    geoclip                        ViT-L-14 / openai weights (hub or its cache)
    geoclip:hf-hub:org/repo        an open_clip ViT-L/14 on the hub
    geoclip:local-dir:/path        an open_clip local dir (open_clip_config.json + weights)
    geoclip:random                 random-init ViT-L/14, for plumbing tests only
    geoclip + weights=<file>       ViT-L-14 with a local .safetensors/.pth
"""
from __future__ import annotations

import torch

from geo.models.location import ImageProjection
from geo.models.registry import (
    Backbone,
    BackboneError,
    load_backbone,
    register_backbone,
)

CLIP_ARCH = "ViT-L-14"
CLIP_TAG = "openai"
CLIP_DIM = 768


class GeoClipImageEncoder(torch.nn.Module):
    """CLIP image tower then GeoCLIP's MLP (unnormalised; Backbone.embed normalises)."""

    def __init__(self, clip_tower: torch.nn.Module, mlp: torch.nn.Module):
        super().__init__()
        self.clip = clip_tower
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.clip(x).flatten(1).to(self.mlp[0].weight.dtype))


def clip_name(spec: str, weights: str | None) -> str:
    """The open_clip backbone name for a geoclip spec."""
    if spec.startswith(("hf-hub:", "local-dir:")):
        return f"open_clip:{spec}"
    if spec == "random" or weights:
        return f"open_clip:{CLIP_ARCH}"
    if spec:
        raise BackboneError(f"geoclip:{spec}: expected geoclip, geoclip:random, geoclip:hf-hub:org/repo or "
                            f"geoclip:local-dir:/path")
    return f"open_clip:{CLIP_ARCH}/{CLIP_TAG}"


def load_geoclip_backbone(spec: str, weights: str | None, cache_dir: str | None) -> Backbone:
    clip = load_backbone(clip_name(spec, weights), device="cpu", precision="fp32", weights=weights, cache_dir=cache_dir)
    if clip.dim != CLIP_DIM:
        raise BackboneError(f"geoclip:{spec}: the CLIP image tower gives {clip.dim}-d features; GeoCLIP's MLP "
                            f"needs CLIP ViT-L/14's {CLIP_DIM}-d")
    model = GeoClipImageEncoder(clip.model, ImageProjection.from_geoclip().mlp).eval()
    name = "geoclip" + (f":{spec}" if spec else "")
    return Backbone(name, 512, clip.preprocess, model, {**clip.weights, "mlp": "geoclip image_encoder_mlp_weights.pth"})


register_backbone("geoclip", load_geoclip_backbone,
                  "GeoCLIP: CLIP ViT-L/14 (openai | hf-hub: | local-dir: | random) + GeoCLIP's image MLP, 512-d; "
                  "the gallery stage then uses GeoCLIP's location encoder and 100K gallery")
