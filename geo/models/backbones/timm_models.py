"""Any timm model by name, with local weights (random init without: plumbing tests only)."""
from __future__ import annotations

import warnings

from geo.data.images import Preprocess
from geo.models.registry import Backbone, BackboneError, register_backbone
from geo.models.weights import (
    file_weights,
    probe_dim,
    random_init,
    read_state_dict,
    seeded,
)


def _load_timm(spec: str, weights: str | None, cache_dir: str | None) -> Backbone:
    import timm
    from timm.data import resolve_data_config

    if not spec:
        raise BackboneError("timm backbone needs a model name: timm:<name>, e.g. timm:resnet18")
    try:
        model = seeded(lambda: timm.create_model(spec, pretrained=False, num_classes=0))
    except RuntimeError as e:
        raise BackboneError(f"timm:{spec}: {e}") from None
    if weights:
        sd = read_state_dict(weights)
        head = model.pretrained_cfg.get("classifier") or ()
        heads = (head,) if isinstance(head, str) else tuple(head)
        sd = {k: v for k, v in sd.items() if not any(k.startswith(h + ".") for h in heads)}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise BackboneError(f"{weights}: does not fit timm:{spec} (missing {missing[:3]}, unexpected {unexpected[:3]})")
        info = file_weights(weights)
    else:
        info = random_init(f"timm:{spec}")
    cfg = resolve_data_config({}, model=model)
    size = int(cfg["input_size"][-1])
    if cfg["input_size"][-1] != cfg["input_size"][-2]:
        raise BackboneError(f"timm:{spec}: non-square input {cfg['input_size']} is not supported")
    interp = cfg.get("interpolation", "bicubic")
    if interp not in ("bicubic", "bilinear"):
        warnings.warn(f"timm:{spec}: interpolation {interp!r} replaced by bicubic", stacklevel=3)
        interp = "bicubic"
    pre = Preprocess(size=size, resize=max(size, int(size / cfg.get("crop_pct", 1.0))),
                     mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), interpolation=interp)
    return Backbone(f"timm:{spec}", probe_dim(model, size), pre, model, info)


register_backbone("timm", _load_timm, "timm:<model> with weights=<.safetensors/.pth> (random init without)")
