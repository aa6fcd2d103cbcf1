"""Reading weight files without unpickling, and the weight records a bundle keeps.

Weight files are read as safetensors or with ``torch.load(weights_only=True)``:
never unpickled. Each loaded file is recorded with its sha256, so a query can
refuse weights other than those the index was built with.
"""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from geo.models.registry import BackboneError
from geo.store.atomic import sha256_file


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, mtime_ns: int, size: int) -> str:
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


def file_weights(path: str | os.PathLike, source: str = "file") -> dict[str, Any]:
    return {"kind": "file", "source": source, "path": str(Path(path).resolve()), "sha256": file_sha256(path)}


def random_init(name: str) -> dict[str, Any]:
    warnings.warn(f"{name}: NO WEIGHTS GIVEN, RANDOM INITIALISATION (seed 0). Embeddings mean nothing: "
                  f"for plumbing tests only. Pass weights=<file>.", stacklevel=4)
    return {"kind": "random", "source": "random-init(seed=0)", "path": None, "sha256": None}


def seeded(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Random init reproducible across processes, so build and query agree even in plumbing tests."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


@torch.inference_mode()
def probe_dim(model: torch.nn.Module, size: int) -> int:
    model.eval()
    return int(model(torch.zeros(1, 3, size, size)).flatten(1).shape[1])



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


