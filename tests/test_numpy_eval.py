"""A warm query's one row runs the cell heads in numpy: the same logits and scene probabilities as the module."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from geo.models.heads import CellHeads, head_logits
from geo.models.numpy_eval import numpy_forward


@pytest.mark.parametrize("head,n_scenes", [("linear", 0), ("mlp", 0), ("linear", 3), ("mlp", 3)])
def test_one_row_in_numpy_gives_the_module_logits(head, n_scenes):
    torch.manual_seed(0)
    model = CellHeads(16, [4, 9], head=head, hidden=24, n_scenes=n_scenes).eval()
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    scene = np.array([-1, 2, 0, -1, 1]) if n_scenes else None
    batch, scenes = head_logits(model, x, scene)  # through the module
    for i in range(len(x)):
        one, one_scene = head_logits(model, x[i:i + 1], None if scene is None else scene[i:i + 1])
        for a, b in zip(one, batch):
            np.testing.assert_allclose(a[0], b[i], rtol=1e-5, atol=1e-6)
        if n_scenes:
            np.testing.assert_allclose(one_scene[0], scenes[i], rtol=1e-5, atol=1e-6)
    if n_scenes:  # a known scene is its one-hot label
        np.testing.assert_array_equal(scenes[2], [1.0, 0.0, 0.0])


def test_a_layer_without_a_numpy_form_is_named():
    with pytest.raises(TypeError, match="Tanh"):
        numpy_forward(nn.Sequential(nn.Linear(2, 2), nn.Tanh()), np.ones((1, 2), np.float32))


def test_a_layer_changed_after_its_first_numpy_call_answers_with_its_new_weights():
    """The numpy views of a layer's parameters are kept between calls: an optimiser's in-place step, a new
    parameter and a layer moved to another dtype must still give the module's own answer."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    x = np.random.default_rng(1).standard_normal((1, 6)).astype(np.float32)

    def agrees() -> None:
        with torch.no_grad():
            want = layer(torch.from_numpy(x).to(layer.weight.dtype)).float().numpy()
        np.testing.assert_allclose(numpy_forward(layer, x), want, rtol=1e-3, atol=1e-3)

    agrees()
    with torch.no_grad():
        layer.weight.mul_(-2.0)  # in place, as an optimiser steps
    agrees()
    layer.bias = nn.Parameter(torch.full((3,), 5.0))  # a new parameter object
    agrees()
    layer.weight.data = torch.randn(3, 6)  # the same parameter on new memory
    agrees()
    layer.double()  # another dtype: converted on every call, never kept
    agrees()
    with torch.no_grad():
        layer.weight.add_(1.0)
    agrees()
