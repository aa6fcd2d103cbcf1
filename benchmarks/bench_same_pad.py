"""EfficientNet-Lite0's stride-2 depthwise convolutions: "SAME" padding as a copy of the input (timm's way)
against the kernel with a leading row and column of zeros that geo's ``_SameConv`` uses instead.

    python benchmarks/bench_same_pad.py [--reps 100]

Two folded copies of geo's network (what ``Backbone.embed`` runs), channels-last, the same random input,
interleaved call by call in one process at batches of 1, 8 and 32: one as geo runs it, one whose depthwise
stride-2 convolutions pad their input first. Prints ms a photo (median and least), the ratio, and the largest
difference of their features (the extra products are exact zeros, so it is 0 wherever oneDNN sums in the same
order).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from geo.models.backbones import load_backbone
from geo.models.efficientnet_lite import _SameConv, folded
from interleaved import compare


class _PadFirst(_SameConv):
    """The same convolution with its input padded first, as timm's ``Conv2dSame`` does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom, left, right = self.same_pads(x)
        return torch.nn.Conv2d.forward(self, F.pad(x, [left, right, top, bottom]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=100, help="calls of each at batch 1 (fewer at 8 and 32)")
    args = ap.parse_args()
    network = load_backbone("efficientnet_lite0", device="cpu").model.eval()
    geo_net, padded = folded(network), folded(network)
    for m in padded.modules():
        if isinstance(m, _SameConv):
            m.__class__ = _PadFirst
    print(f"load average {os.getloadavg()[0]:.2f}")
    compare(("pad first", padded), ("zero-led kernel", geo_net), args.reps)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
