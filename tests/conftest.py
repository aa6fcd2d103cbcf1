"""Shared fixtures. Keep small: images are generated, never downloaded or vendored."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


def _textured(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image (smooth gradients + blocks + noise) so resizes and crops are non-trivial."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(x / (17 + 5 * seed) + c) * np.cos(y / (23 + 3 * seed) - c) for c in range(3)], -1)
    for _ in range(6):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        base[y0:y0 + height // 4, x0:x0 + width // 4] = rng.integers(0, 256, 3)
    base += rng.normal(0, 8, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture
def make_image(tmp_path):
    """make_image(name, width=320, height=240, seed=0, **save_kwargs) -> path of a saved textured image."""

    def make(name: str, width: int = 320, height: int = 240, seed: int = 0, **save_kwargs) -> str:
        path = tmp_path / name
        _textured(width, height, seed).save(path, **save_kwargs)
        return str(path)

    return make


@pytest.fixture
def textured():
    """textured(width, height, seed=0) -> a photo-like RGB PIL image."""
    return _textured
