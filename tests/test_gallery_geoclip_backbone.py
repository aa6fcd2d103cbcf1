"""The geoclip backbone preset: CLIP image tower from a local dir, then GeoCLIP's image MLP. Never the hub."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from geo.models.backbones.geoclip_image import (
    clip_name,  # importing registers "geoclip"
)
from geo.models.location import ImageProjection
from geo.models.registry import BackboneError, load_backbone

TINY_CLIP = {  # a 768-d CLIP small enough for CI; the preset loads it exactly as it would ViT-L/14
    "embed_dim": 768,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


@pytest.fixture()
def clip_dir(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY_CLIP)
    cfg = {"model_cfg": TINY_CLIP, "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN),
                                                      "std": list(open_clip.OPENAI_DATASET_STD)}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    return tmp_path, model.eval()


def test_local_dir_clip_plus_geoclip_mlp(clip_dir):
    path, clip = clip_dir
    bb = load_backbone(f"geoclip:local-dir:{path}", device="cpu", precision="fp32")
    assert bb.dim == 512 and bb.name == f"geoclip:local-dir:{path}"
    assert bb.preprocess.size == 224 and bb.weights["sha256"]
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(ImageProjection.from_geoclip().mlp(clip.encode_image(x)), dim=1)
    np.testing.assert_allclose(bb.embed(x), ref.numpy(), atol=1e-5)


def test_names():
    assert clip_name("", None) == "open_clip:ViT-L-14/openai"
    assert clip_name("random", None) == "open_clip:ViT-L-14"
    assert clip_name("", "/w/clip.safetensors") == "open_clip:ViT-L-14"
    assert clip_name("hf-hub:org/repo", None) == "open_clip:hf-hub:org/repo"
    with pytest.raises(BackboneError, match="geoclip:nonsense"):
        clip_name("nonsense", None)


def test_refuses_a_clip_of_another_width(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    cfg = {**TINY_CLIP, "embed_dim": 512}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file({k: v.contiguous() for k, v in open_clip.model.CLIP(**cfg).state_dict().items()},
              str(tmp_path / "open_clip_model.safetensors"))
    with pytest.raises(BackboneError, match="768"):
        load_backbone(f"geoclip:local-dir:{tmp_path}", device="cpu", precision="fp32")
