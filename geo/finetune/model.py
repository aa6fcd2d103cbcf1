"""What is trained besides the backbone, which of its parameters move, and what the pixels go through.

The heads are scaffolding: one classifier per partition, the optional unit-sphere regression (Manocchio &
Passaro) and the optional projection into GeoCLIP's location space. They shape the backbone's features and
are then discarded (they live in the checkpoint, not in model.safetensors): the bundle fits its own.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from geo.models.location import ImageProjection


class Heads(torch.nn.Module):
    """One linear classifier per partition, the optional unit-sphere regression head and the optional projection
    into GeoCLIP's location space (with its learnable logit scale)."""

    def __init__(self, dim: int, cells: list[int], regression: bool, contrastive: bool):
        super().__init__()
        self.cells = torch.nn.ModuleList(torch.nn.Linear(dim, n) for n in cells)
        self.xyz = torch.nn.Linear(dim, 3) if regression else None
        self.proj = ImageProjection(in_dim=dim, out_dim=512, hidden=dim) if contrastive else None

    def forward(self, f: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        xyz = F.normalize(self.xyz(f), dim=1) if self.xyz is not None else None
        gps = F.normalize(self.proj(f), dim=1) if self.proj is not None else None
        return [h(f) for h in self.cells], xyz, gps


def augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Horizontal flip and a random crop of 70-100 % of the side, resized back: seeded, so a resumed run sees
    the same pixels as an uninterrupted one."""
    n, _, s, _ = x.shape
    out = torch.empty_like(x)
    flips, scales = rng.random(n) < 0.5, rng.uniform(0.7, 1.0, n)
    offsets = rng.random((n, 2))
    for i in range(n):
        side = max(8, int(round(s * scales[i])))
        top, left = int(offsets[i, 0] * (s - side)), int(offsets[i, 1] * (s - side))
        crop = x[i:i + 1, :, top:top + side, left:left + side]
        if side != s:
            crop = F.interpolate(crop, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        out[i] = crop[0].flip(-1) if flips[i] else crop[0]
    return out


def freeze(model: torch.nn.Module, until: str | None) -> int:
    """Fix every parameter before the first whose name starts with ``until`` (the early layers know edges and
    textures, not places, and fixing them makes a CPU run several times faster); returns how many stay
    trainable."""
    if until is None:
        return sum(p.numel() for p in model.parameters())
    names = [n for n, _ in model.named_parameters()]
    first = next((i for i, n in enumerate(names) if n.startswith(until)), None)
    if first is None:
        raise ValueError(f"freeze_until {until!r} names no parameter of this backbone; its first are "
                         f"{', '.join(names[:3])} ... and its blocks {sorted({n.split('.')[0] for n in names})}")
    for i, (_, p) in enumerate(model.named_parameters()):
        p.requires_grad_(i >= first)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def keep_batchnorm_statistics(model: torch.nn.Module) -> None:
    """Batch statistics of 16-64 photos are noise: fine-tuning keeps the pretrained BatchNorm statistics."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
