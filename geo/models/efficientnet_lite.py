"""EfficientNet-Lite0 in plain torch: the default backbone without importing timm or torchvision.

Why its own module: ``import timm`` costs about 2.3 s here (it pulls in
torchvision and ``torch._dynamo``), more than half of a cold ``geo query``
beyond ``import torch``. The network is small and fixed, so it is written out:
the TF release's architecture (Tan & Le 2019, "lite" variant: ReLU6, no
squeeze-excitation, stem and head not scaled) with TF "same" padding and
BatchNorm eps 1e-3, exactly timm's ``tf_efficientnet_lite0``. Parameter and
buffer names and their order are timm's, so the same state dicts load into
either; ``tests/test_backbones.py`` checks the outputs match timm's to float
rounding.

:func:`folded` is the copy that embeds: each BatchNorm folded into the convolution before it.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

# (block kind, repeats, kernel, first stride, expansion, output channels): timm's
# ``ds_r1_k3_s1_e1_c16`` ... ``ir_r1_k3_s1_e6_c320`` at width and depth 1.0.
_STAGES = (("ds", 1, 3, 1, 1, 16), ("ir", 2, 3, 2, 6, 24), ("ir", 2, 5, 2, 6, 40), ("ir", 3, 3, 2, 6, 80),
           ("ir", 3, 5, 1, 6, 112), ("ir", 4, 5, 2, 6, 192), ("ir", 1, 3, 1, 6, 320))
_STEM, _FEATURES, _BN_EPS = 32, 1280, 1e-3


class _SameConv(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding: the total pad depends on the input size and goes
    mostly to the bottom/right, which a static symmetric padding cannot express for stride 2.

    A depthwise convolution pads no copy of its input. Where a side needs one row more at the bottom than at the
    top, the kernel gets a leading row of zeros instead and both sides the larger pad: the same products, plus
    exact zeros. Padding Lite0's 96 x 112 x 112 map first made oneDNN's depthwise convolution 1.2 ms instead of
    0.13 (a quarter of a photo's forward; ``benchmarks/bench_same_pad.py``). A dense convolution (the stem)
    still pads its input: its (k+1)^2 kernel would cost more products than the copy saves."""

    def same_pads(self, x: torch.Tensor) -> tuple[int, int, int, int]:
        """(top, bottom, left, right): TF's "SAME" padding of ``x`` for this kernel and stride."""
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return pads[0], pads[1], pads[2], pads[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom, left, right = self.same_pads(x)
        if self.groups == 1 or self.groups != self.in_channels:
            return super().forward(F.pad(x, [left, right, top, bottom]))
        weight = self.weight
        if bottom > top or right > left:
            weight = F.pad(weight, [right - left, 0, bottom - top, 0])
        return F.conv2d(x, weight, self.bias, self.stride, (bottom, right), self.dilation, self.groups)


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """At stride 1 with an odd kernel, "SAME" is a fixed symmetric pad, which Conv2d does without a copy."""
    if stride == 1:
        return nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False)
    return _SameConv(cin, cout, k, stride=stride, groups=groups, bias=False)


class _BNAct(nn.BatchNorm2d):
    """BatchNorm with an optional ReLU6 after it (timm's BatchNormAct2d: same state-dict names)."""

    def __init__(self, channels: int, act: bool):
        super().__init__(channels, eps=_BN_EPS)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class _DepthwiseSeparable(nn.Module):
    """ds block: depthwise k x k, BN+ReLU6, pointwise 1x1, BN; residual when shapes allow."""

    FOLDS = (("conv_dw", "bn1"), ("conv_pw", "bn2"))  # (convolution, the BatchNorm right after it): see folded

    def __init__(self, cin: int, cout: int, k: int, stride: int):
        super().__init__()
        self.conv_dw = _conv(cin, cin, k, stride, groups=cin)
        self.bn1 = _BNAct(cin, act=True)
        self.conv_pw = _conv(cin, cout, 1)
        self.bn2 = _BNAct(cout, act=False)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv_pw(self.bn1(self.conv_dw(x))))
        return x + y if self.skip else y


class _InvertedResidual(nn.Module):
    """ir block (MobileNetV2): expand 1x1, depthwise k x k, project 1x1; residual when shapes allow."""

    FOLDS = (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3"))

    def __init__(self, cin: int, cout: int, k: int, stride: int, expansion: int):
        super().__init__()
        mid = cin * expansion
        self.conv_pw = _conv(cin, mid, 1)
        self.bn1 = _BNAct(mid, act=True)
        self.conv_dw = _conv(mid, mid, k, stride, groups=mid)
        self.bn2 = _BNAct(mid, act=True)
        self.conv_pwl = _conv(mid, cout, 1)
        self.bn3 = _BNAct(cout, act=False)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(self.conv_pw(x))
        y = self.bn3(self.conv_pwl(self.bn2(self.conv_dw(y))))
        return x + y if self.skip else y


class EfficientNetLite0(nn.Module):
    """Image [n,3,h,w] -> pooled features [n,1280] (the classifier is left out: geo embeds, never classifies).

    ``load_state_dict`` takes timm-named weights with or without ``classifier.*``.
    """

    num_features = _FEATURES
    FOLDS = (("conv_stem", "bn1"), ("conv_head", "bn2"))

    def __init__(self) -> None:
        super().__init__()
        self.conv_stem = _conv(3, _STEM, 3, stride=2)
        self.bn1 = _BNAct(_STEM, act=True)
        stages, cin = [], _STEM
        for kind, repeats, k, stride, expansion, cout in _STAGES:
            blocks = []
            for r in range(repeats):
                s = stride if r == 0 else 1
                blocks.append(_DepthwiseSeparable(cin, cout, k, s) if kind == "ds"
                              else _InvertedResidual(cin, cout, k, s, expansion))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = _conv(cin, _FEATURES, 1)
        self.bn2 = _BNAct(_FEATURES, act=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))
        return x.mean(dim=(2, 3))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("classifier.")}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def folded(model: EfficientNetLite0) -> EfficientNetLite0:
    """An eval-only copy with each BatchNorm folded into the convolution before it (a bias added), leaving its
    ReLU6: what :meth:`geo.models.registry.Backbone.embed` runs.

    Why: in eval mode a BatchNorm is a per-channel scale and shift, but torch runs it as one more pass over every
    activation map. Folded, the forward took 21-38 % less time here at batches of 1, 8 and 32 (interleaved runs,
    benchmarks/RESULTS.md); the features agree to 2e-6 of their size (float rounding: ``tests/test_backbones.py``).
    The folding is done in float32 whatever the model's precision. ``model`` itself keeps its BatchNorms:
    ``geo finetune`` trains them.
    """
    out = _tree(model)
    with torch.no_grad():
        for module in out.modules():
            for conv_name, bn_name in getattr(module, "FOLDS", ()):
                conv, bn = getattr(module, conv_name), getattr(module, bn_name)
                w = conv.weight
                scale = bn.weight.float() / torch.sqrt(bn.running_var.float() + bn.eps)
                weight = (w.float() * scale[:, None, None, None]).to(w.dtype)
                conv.weight = nn.Parameter(weight.contiguous(memory_format=torch.channels_last), requires_grad=False)
                conv.bias = nn.Parameter((bn.bias.float() - bn.running_mean.float() * scale).to(w.dtype),
                                         requires_grad=False)
                setattr(module, bn_name, bn.act)
    return out.eval()


def _tree(module: nn.Module) -> nn.Module:
    """A copy of the module tree that shares its tensors until :func:`folded` replaces them in the copy alone:
    the fold runs on a cold query's first photo, where ``copy.deepcopy`` (every tensor copied) cost 18 of its
    33 ms and this copy costs 1.5."""
    out = copy.copy(module)
    out._parameters, out._buffers = dict(module._parameters), dict(module._buffers)
    out._modules = {name: _tree(child) for name, child in module._modules.items()}
    return out
