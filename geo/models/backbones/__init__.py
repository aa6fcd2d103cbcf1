"""Every backbone module, imported so that each registers itself; use this package, not the registry, to load one.

Adding a backbone: a module here that calls :func:`geo.models.registry.register_backbone`
at import, and one import line below.
"""
from __future__ import annotations

from geo.models.backbones import (  # noqa: F401
                                 finetuned,
                                 geoclip_image,
                                 lite0,
                                 open_clip_models,
                                 timm_models,
                                 torchvision_models,
)
from geo.models.registry import (
                                 Backbone,
                                 BackboneError,
                                 Preprocess,
                                 available_backbones,
                                 backbone_from_spec,
                                 load_backbone,
                                 register_backbone,
)

__all__ = ["Backbone", "BackboneError", "Preprocess", "available_backbones", "backbone_from_spec", "load_backbone",
           "register_backbone"]
