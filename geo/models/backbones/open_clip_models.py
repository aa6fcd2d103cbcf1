"""open_clip image towers: pretrained tags, ``hf-hub:org/repo`` and ``local-dir:/path`` names."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from geo.models.hub import WeightsNotLocal, configure_hub, how_to_get
from geo.data.images import Preprocess
from geo.models.registry import Backbone, BackboneError, register_backbone
from geo.models.weights import file_weights, probe_dim, random_init, seeded


class _ClipImageTower(torch.nn.Module):
    def __init__(self, clip: torch.nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(x)


def _load_open_clip(spec: str, weights: str | None, cache_dir: str | None) -> Backbone:
    """open_clip:<arch>[/<tag>], open_clip:hf-hub:org/repo, open_clip:local-dir:/path; embedding = encode_image."""
    import open_clip

    if not spec:
        raise BackboneError("open_clip backbone needs an architecture, e.g. open_clip:ViT-B-32/laion2b_s34b_b79k")
    schema = spec.startswith(("hf-hub:", "local-dir:"))
    arch, tag = (spec, None) if schema else (spec.partition("/")[0], spec.partition("/")[2] or None)
    if weights and (schema or tag):
        raise BackboneError(f"open_clip:{spec}: give either a pretrained tag/hub/local-dir or weights=, not both")
    pretrained = weights or tag
    if spec.startswith("local-dir:") and not Path(spec[len("local-dir:"):], "open_clip_config.json").is_file():
        raise BackboneError(f"{spec[len('local-dir:'):]}: no open_clip_config.json (expected an open_clip local-dir)")
    online = configure_hub()  # offline for the whole process unless downloads were allowed
    _require_local(spec, arch, tag, cache_dir, online)  # before building the model: a missing file fails in seconds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            clip, _, _ = seeded(lambda: open_clip.create_model_and_transforms(
                arch, pretrained=pretrained, cache_dir=cache_dir, device="cpu", precision="fp32"))
        except (RuntimeError, ValueError, FileNotFoundError) as e:
            raise BackboneError(f"open_clip:{spec}: {e}") from None
    info = _open_clip_weights(spec, arch, tag, weights, cache_dir)
    cfg = clip.visual.preprocess_cfg
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    if not isinstance(cfg["size"], int) and cfg["size"][0] != cfg["size"][1]:
        raise BackboneError(f"open_clip:{spec}: non-square input {cfg['size']} is not supported")
    if cfg.get("resize_mode", "shortest") != "shortest":
        warnings.warn(f"open_clip:{spec}: resize_mode {cfg['resize_mode']!r} approximated by shorter-side "
                      f"resize + centre crop", stacklevel=3)
    pre = Preprocess(size=int(size), resize=int(size), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                     interpolation=cfg.get("interpolation", "bicubic"))
    model = _ClipImageTower(clip)
    return Backbone(f"open_clip:{spec}", probe_dim(model, pre.size), pre, model, info)


def _require_local(spec: str, arch: str, tag: str | None, cache_dir: str | None, online: bool) -> None:
    """Resolve a hub tag or ``hf-hub:`` name to a file now (from the cache unless ``online``: downloads were
    allowed), or raise WeightsNotLocal with the steps to get it; local dirs, weight files and random init need
    nothing."""
    import open_clip
    from open_clip.pretrained import download_pretrained_from_hf

    if spec.startswith("hf-hub:"):
        repo = spec[len("hf-hub:"):]
        fetch = lambda: download_pretrained_from_hf(repo, filename="open_clip_config.json", cache_dir=cache_dir)  # noqa: E731
    elif tag:
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        if not cfg:
            return  # an unknown tag: open_clip names the valid ones
        repo = os.path.split(cfg["hf_hub"])[0] if cfg.get("hf_hub") else None  # "org/model/" or "org/model/file"
        if not repo and not online:  # a plain URL: only its cached file counts
            cached = Path(cache_dir or Path.home() / ".cache" / "clip", Path(cfg.get("url", "")).name)
            if not cached.is_file():
                raise WeightsNotLocal(how_to_get(f"open_clip:{spec}", None, None, cache_dir))
            return
        fetch = lambda: open_clip.download_pretrained(cfg, cache_dir=cache_dir)  # noqa: E731
    else:
        return
    try:
        found = fetch()
    except Exception:
        found = None
    if not found:
        if online:
            raise BackboneError(f"open_clip:{spec}: could not download its weights (is the network reachable?)")
        include = None if spec.startswith("hf-hub:") else "open_clip_*"  # a tag's repo also holds timm's weights
        raise WeightsNotLocal(how_to_get(f"open_clip:{spec}", repo, include, cache_dir))


def _open_clip_weights(spec: str, arch: str, tag: str | None, weights: str | None, cache_dir: str | None) -> dict:
    if weights:
        return file_weights(weights)
    if spec.startswith("local-dir:"):
        d = Path(spec[len("local-dir:"):])
        files = sorted(p for ext in ("*.safetensors", "*.bin", "*.pth") for p in d.glob(ext))
        if len(files) == 1:
            return file_weights(files[0], source=spec)
        return {"kind": "local-dir", "source": spec, "path": str(d.resolve()), "sha256": None}
    if spec.startswith("hf-hub:") or tag:
        # already downloaded by create_model_and_transforms: this only resolves the cached path
        import open_clip
        from open_clip.pretrained import download_pretrained_from_hf

        try:
            if tag:
                path = open_clip.download_pretrained(open_clip.get_pretrained_cfg(arch, tag), cache_dir=cache_dir)
            else:
                path = download_pretrained_from_hf(spec[len("hf-hub:"):], cache_dir=cache_dir)
            return {**file_weights(path, source=spec), "kind": "hub"}
        except Exception:
            return {"kind": "hub", "source": spec, "path": None, "sha256": None}
    return random_init(f"open_clip:{spec}")


register_backbone("open_clip", _load_open_clip,
                  "open_clip:<arch>/<tag> | open_clip:hf-hub:org/repo | open_clip:local-dir:/path; encode_image")
