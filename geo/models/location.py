"""GeoCLIP-style location encoder and image projection.

Module and parameter names follow GeoCLIP's own (``LocEnc{i}.capsule.0.b``,
``LocEnc{i}.head.0.weight``, image ``mlp.0.weight``) so the weights the PyPI
``geoclip`` package ships load with a plain ``load_state_dict``; nothing is
renamed, so a mismatch shows up as a strict-load error instead of silently
wrong features.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from geo.core.runtime import NUMPY_ROWS
from geo.models.numpy_eval import numpy_forward
from geo.store.atomic import atomic_save_safetensors

GEOCLIP_SIGMAS: tuple[float, ...] = (2.0**0, 2.0**4, 2.0**8)
GEOCLIP_LOGIT_SCALE = math.log(1 / 0.07)  # GeoCLIP's initial value; its trained one is in the weights

# Equal Earth constants, identical to geo.core.geodesy (tests check the two agree).
_A1, _A2, _A3, _A4 = 1.340264, -0.081106, 0.000893, 0.003796
_SF = 66.50336


def geoclip_dir() -> Path:
    """The installed ``geoclip`` package directory, found without importing it (that pulls in transformers)."""
    spec = importlib.util.find_spec("geoclip")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the `geoclip` package is not installed (pip install geoclip) — its weights are needed")
    return Path(spec.origin).parent


def geoclip_weights_dir() -> Path:
    return geoclip_dir() / "model" / "weights"


def geoclip_gallery_csv() -> Path:
    """GeoCLIP's 100K GPS gallery as shipped in the ``geoclip`` package."""
    return geoclip_dir() / "model" / "gps_gallery" / "coordinates_100K.csv"


def _load_pth(path: Path) -> dict[str, torch.Tensor] | torch.Tensor:
    if not path.exists():
        raise FileNotFoundError(f"{path}: GeoCLIP weight file missing (reinstall the `geoclip` package)")
    return torch.load(path, map_location="cpu", weights_only=True)


def equal_earth_torch(latlon: torch.Tensor) -> torch.Tensor:
    """Equal Earth (x, y) of [N, 2] degrees, latitude first.

    A torch twin of :func:`geo.core.geodesy.equal_earth` written with GeoCLIP's
    exact float32 operation order: with sigma = 256 the Fourier phases reach
    thousands of radians, so a different rounding order alone moves features
    by more than 1e-4.
    """
    lat = torch.deg2rad(latlon[:, 0])
    lon = torch.deg2rad(latlon[:, 1])
    sqrt3 = torch.sqrt(torch.tensor(3.0, dtype=latlon.dtype, device=latlon.device))
    theta = torch.asin((sqrt3 / 2) * torch.sin(lat))
    den = 3 * (9 * _A4 * theta**8 + 7 * _A3 * theta**6 + 3 * _A2 * theta**2 + _A1)
    x = (2 * sqrt3 * lon * torch.cos(theta)) / den
    y = _A4 * theta**9 + _A3 * theta**7 + _A2 * theta**3 + _A1 * theta
    return (torch.stack((x, y), dim=1) * _SF) / 180


class GaussianEncoding(nn.Module):
    """Random Fourier features cos/sin(2 pi B v); ``b`` is fixed, not learned, but it is part of the weights."""

    def __init__(self, sigma: float, input_size: int = 2, encoded_size: int = 256, generator: torch.Generator | None = None):
        super().__init__()
        self.register_buffer("b", torch.randn((encoded_size, input_size), generator=generator) * sigma)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        vp = 2 * np.pi * v @ self.b.T
        return torch.cat((torch.cos(vp), torch.sin(vp)), dim=-1)


class LocationEncoderCapsule(nn.Module):
    """One sigma's branch: RFF -> MLP; the branches are summed so each can own one spatial scale."""

    def __init__(self, sigma: float, n_freq: int, hidden: int, depth: int, out_dim: int, generator: torch.Generator | None):
        super().__init__()
        layers: list[nn.Module] = [GaussianEncoding(sigma, 2, n_freq, generator)]
        width = 2 * n_freq
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.capsule = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.capsule(x))


class LocationEncoder(nn.Module):
    """Coordinates (degrees, latitude first) -> Equal Earth -> sum over sigmas of RFF+MLP -> [N, out_dim].

    Outputs are not normalised (GeoCLIP normalises at the similarity); use
    :meth:`encode` for L2-normalised numpy features.
    """

    def __init__(self, sigmas: Sequence[float] = GEOCLIP_SIGMAS, n_freq: int = 256, hidden: int = 1024,
                 depth: int = 3, out_dim: int = 512, seed: int = 0):
        super().__init__()
        if not sigmas:
            raise ValueError("LocationEncoder needs at least one sigma")
        self.sigmas = [float(s) for s in sigmas]
        self.n_freq, self.hidden, self.depth, self.out_dim, self.seed = n_freq, hidden, depth, out_dim, seed
        gen = torch.Generator().manual_seed(seed)
        for i, s in enumerate(self.sigmas):
            self.add_module(f"LocEnc{i}", LocationEncoderCapsule(s, n_freq, hidden, depth, out_dim, gen))

    def config(self) -> dict:
        return {"sigmas": self.sigmas, "n_freq": self.n_freq, "hidden": self.hidden, "depth": self.depth,
                "out_dim": self.out_dim, "seed": self.seed}

    @classmethod
    def from_geoclip(cls, weights_dir: str | Path | None = None, extra_sigmas: Sequence[float] = ()) -> "LocationEncoder":
        """GeoCLIP's published location encoder (sigmas 2^0, 2^4, 2^8).

        ``extra_sigmas`` (e.g. 2^12, GeoCLIP issue #7) add freshly initialised
        branches after GeoCLIP's; their last layer starts at zero so the model
        begins exactly as GeoCLIP and training decides what the new scale adds.
        """
        path = Path(weights_dir or geoclip_weights_dir()) / "location_encoder_weights.pth"
        state = _load_pth(path)
        enc = cls(sigmas=[*GEOCLIP_SIGMAS, *extra_sigmas])
        missing, unexpected = enc.load_state_dict(state, strict=False)
        new = {f"LocEnc{i}" for i in range(len(GEOCLIP_SIGMAS), len(enc.sigmas))}
        if unexpected or any(k.split(".")[0] not in new for k in missing):
            raise ValueError(f"{path}: not a GeoCLIP location encoder (missing {missing[:3]}, unexpected {unexpected[:3]})")
        for name in new:
            head = getattr(enc, name).head[0]
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        return enc.eval()

    def forward(self, latlon: torch.Tensor) -> torch.Tensor:
        x = equal_earth_torch(latlon)
        out = torch.zeros(x.shape[0], self.out_dim, dtype=x.dtype, device=x.device)
        for i in range(len(self.sigmas)):
            out = out + getattr(self, f"LocEnc{i}")(x)
        return out

    @torch.no_grad()
    def encode(self, latlon: np.ndarray, batch: int = 8192, normalize: bool = False) -> np.ndarray:
        """float32 [N, out_dim] features of [N, 2] degrees (latitude first), in batches to bound memory."""
        latlon = np.asarray(latlon, dtype=np.float32)
        if latlon.ndim != 2 or latlon.shape[1] != 2:
            raise ValueError(f"encode expects latlon of shape [N, 2], got {latlon.shape}")
        return _batched_features(self, latlon, batch, normalize)


class ImageProjection(nn.Module):
    """Image embedding -> location-feature space, plus the learnable temperature of the contrastive logits.

    ``residual=True`` (needs in_dim == out_dim) computes x + mlp(x) with the
    last layer at zero, i.e. the identity at start: for embeddings already in
    GeoCLIP's space (the ``geoclip`` backbone) training starts from GeoCLIP.
    """

    def __init__(self, in_dim: int = 768, out_dim: int = 512, hidden: int = 768, dropout: float = 0.0,
                 residual: bool = False, logit_scale: float = GEOCLIP_LOGIT_SCALE):
        super().__init__()
        if residual and in_dim != out_dim:
            raise ValueError(f"residual ImageProjection needs in_dim == out_dim, got {in_dim} and {out_dim}")
        self.in_dim, self.out_dim, self.hidden, self.dropout, self.residual = in_dim, out_dim, hidden, dropout, residual
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden, out_dim))
        self.mlp = nn.Sequential(*layers)
        if residual:
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))

    def config(self) -> dict:
        return {"in_dim": self.in_dim, "out_dim": self.out_dim, "hidden": self.hidden, "dropout": self.dropout,
                "residual": self.residual}

    @classmethod
    def from_geoclip(cls, weights_dir: str | Path | None = None) -> "ImageProjection":
        """GeoCLIP's image MLP (CLIP ViT-L/14 768-d projected features -> 512) and its trained logit scale."""
        wdir = Path(weights_dir or geoclip_weights_dir())
        proj = cls(in_dim=768, out_dim=512, hidden=768)
        path = wdir / "image_encoder_mlp_weights.pth"
        try:
            proj.mlp.load_state_dict(_load_pth(path))
        except RuntimeError as e:
            raise ValueError(f"{path}: not GeoCLIP's image MLP ({e})") from None
        proj.logit_scale.data.copy_(_load_pth(wdir / "logit_scale_weights.pth").reshape(()))
        return proj.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(x)
        return x + y if self.residual else y

    def encode(self, emb: np.ndarray, batch: int = 65536, normalize: bool = False) -> np.ndarray:
        """float32 [N, out_dim] projected features of float32 [N, in_dim] embeddings (the eval-mode forward).

        A warm query's one row (:data:`~geo.core.runtime.NUMPY_ROWS`) runs in numpy (:mod:`geo.models.numpy_eval`);
        batches run through the module."""
        emb = np.asarray(emb, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.in_dim:
            raise ValueError(f"ImageProjection expects embeddings [N, {self.in_dim}], got {emb.shape}")
        if len(emb) != NUMPY_ROWS:
            with torch.no_grad():
                return _batched_features(self, emb, batch, normalize)
        y = numpy_forward(self.mlp, emb)
        if self.residual:
            y = emb + y
        if normalize:  # as torch's F.normalize: a zero row stays zero
            y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
        return y


def save_module(path: str | Path, module: LocationEncoder | ImageProjection) -> None:
    """safetensors with the constructor config in the metadata, so the file alone rebuilds the module."""
    meta = {"class": type(module).__name__, "config": json.dumps(module.config())}
    atomic_save_safetensors(path, module.state_dict(), metadata=meta)


def load_module(path: str | Path) -> LocationEncoder | ImageProjection:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    classes = {"LocationEncoder": LocationEncoder, "ImageProjection": ImageProjection}
    if meta.get("class") not in classes or "config" not in meta:
        raise ValueError(f"{path}: no location-encoder or image-projection metadata (class/config)")
    module = classes[meta["class"]](**json.loads(meta["config"]))
    try:
        module.load_state_dict(load_file(str(path)))
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the stored config ({e})") from None
    return module.eval()


def _batched_features(module: nn.Module, x: np.ndarray, batch: int, normalize: bool) -> np.ndarray:
    """Run ``module`` in eval mode over float32 rows of ``x`` in batches; float32 [N, out_dim] on the CPU."""
    device = next(module.parameters()).device
    was_training = module.training
    if was_training:  # ``train()`` walks every submodule: a warm query's projection is already in eval mode
        module.eval()
    out = []
    for i in range(0, len(x), batch):
        f = module(torch.from_numpy(x[i:i + batch]).to(device))
        out.append((nn.functional.normalize(f, dim=1) if normalize else f).float().cpu().numpy())
    if was_training:
        module.train()
    return np.concatenate(out) if out else np.zeros((0, module.out_dim), np.float32)
