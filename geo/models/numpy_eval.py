"""The eval-mode forward of small layer stacks in numpy, for modules on the CPU: what a warm query runs after the
backbone (the gallery's image projection, the cell heads, the city head).

Such a query runs a handful of small layers on one row. There torch's per-call cost dominates: the cell heads'
three linear layers took 0.51 ms through the module and 0.07 ms as numpy products; the projection's 7 MB of
weights stream in ~0.7 ms on one OpenBLAS thread against ~1.2 ms through torch's MKL path on this AMD CPU. The values agree with the module's forward within float32 rounding (tests check
each module). An activation numpy lacks (GELU's erf) is torch's own function on the numpy array's memory, so it is
the one the module trained with.

Only for :data:`geo.core.runtime.NUMPY_ROWS` rows (one): a row's result from numpy's matrix products depends on the
size of the batch it came in (here torch's do not, from two rows up), and a build's answers must not depend on how
it blocks its photos to bound memory. Batches, training and modules on a GPU keep torch.
"""
from __future__ import annotations

import weakref

import numpy as np
import torch
from torch import nn


def numpy_forward(layer: nn.Module, x: np.ndarray) -> np.ndarray:
    """``layer(x)`` in eval mode, for float32 rows ``x`` [n, in]: Sequential stacks of Linear, ReLU, GELU, Dropout
    and Identity layers (a TypeError names any other: it has no numpy form here)."""
    if isinstance(layer, nn.Sequential):
        for sub in layer:
            x = numpy_forward(sub, x)
        return x
    if isinstance(layer, nn.Linear):
        weight_t, bias = _linear_arrays(layer)
        y = x @ weight_t
        if bias is not None:
            y += bias
        return y
    if isinstance(layer, nn.ReLU):
        return np.maximum(x, 0.0)
    if isinstance(layer, nn.GELU):
        return nn.functional.gelu(torch.from_numpy(np.ascontiguousarray(x)), approximate=layer.approximate).numpy()
    if isinstance(layer, (nn.Dropout, nn.Identity)):  # the identity in eval mode
        return x
    raise TypeError(f"no numpy form of {type(layer).__name__} for the eval-mode forward")


# nn.Linear -> ((weight, bias, their data pointers), weight.T, bias) as numpy views: see _linear_arrays
_VIEWS: "weakref.WeakKeyDictionary[nn.Linear, tuple]" = weakref.WeakKeyDictionary()


def _linear_arrays(layer: nn.Linear) -> tuple[np.ndarray, np.ndarray | None]:
    """A linear layer's weight, transposed, and bias as numpy arrays, made once per layer: converting two
    parameters on every call cost a cell head 14 of its 30 µs. Kept only where they are views of the parameters'
    memory (float32 on the CPU), so an optimiser's in-place steps show through; a parameter replaced or moved
    (``layer.weight = ...``, ``.to()``, ``.half()``) has another object or address, and they are made again."""
    w, b = layer.weight, layer.bias
    key = (w, b, w.data_ptr(), None if b is None else b.data_ptr())
    kept = _VIEWS.get(layer)
    if kept is not None and kept[0][0] is w and kept[0][1] is b and kept[0][2:] == key[2:]:
        return kept[1], kept[2]
    out = _array(w).T, None if b is None else _array(b)
    if all(_shares_memory(t) for t in (w, b) if t is not None):
        _VIEWS[layer] = (key, *out)
    return out


def _shares_memory(p: torch.Tensor) -> bool:
    """Whether :func:`_array` of ``p`` is a view of its memory (float32 on the CPU) rather than a copy."""
    return p.is_cpu and p.dtype == torch.float32


def _array(p: torch.Tensor) -> np.ndarray:
    """A parameter's float32 values as a numpy array (a view where :func:`_shares_memory`, else a copy)."""
    t = p.detach()
    return (t if _shares_memory(t) else t.cpu().float()).numpy()


def softmax_rows(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of float32 logits [n, k]."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
