"""`geo finetune`: it learns (held-out loss falls), checkpoints atomically, resumes to the same state, and its
MODEL_DIR round-trips through build-index and query as a backbone."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from geo.cli import app
from geo.core.geodesy import latlon_to_xyz
from geo.finetune import FinetuneConfig, finetune, read_config
from geo.stages.cells.train import smoothed_targets
from geo.models.backbones import load_backbone

# four places, each with its own colours; two photographers at each (validation holds out whole photographers)
PLACES = [(48.85, 2.35), (40.71, -74.0), (-33.87, 151.21), (35.68, 139.69)]
TINY = "timm:test_efficientnet"  # random init: plumbing, not accuracy


def _photo(path: Path, place: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:96, 0:128].astype(np.float32)
    colour = np.array([[230, 40, 40], [40, 200, 60], [50, 60, 220], [220, 200, 40]][place], np.float32)
    img = colour * (0.6 + 0.4 * np.sin(x / (6 + 3 * place) + rng.uniform(0, 6)))[..., None]
    img += rng.normal(0, 12, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=92)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ft")
    rows = ["path,lat,lon,owner"]
    for i in range(48):
        place = i % 4
        _photo(root / f"p{i}.jpg", place, i)
        lat, lon = PLACES[place]
        rows.append(f"p{i}.jpg,{lat + 0.01 * i},{lon},o{place}{(i // 4) % 3}")
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    return root / "m.csv"


def _cfg(**kw) -> FinetuneConfig:
    return FinetuneConfig(**{"backbone": TINY, "batch_size": 8, "lr": 3e-3, "patience": 10, "epochs": 3, **kw})


def _quiet(*a) -> None:
    return None


def test_smoothed_targets_favour_the_nearest_cell_and_sum_to_one():
    t = smoothed_targets(torch.from_numpy(latlon_to_xyz(np.array([48.85]), np.array([2.35]))),
                         torch.from_numpy(latlon_to_xyz(np.array([48.8, 51.5, -33.9]), np.array([2.3, -0.1, 151.2]))),
                         75.0).numpy()
    assert t.shape == (1, 3) and t.sum() == pytest.approx(1.0) and t[0].argmax() == 0 and t[0, 2] < 1e-30


def test_finetuning_lowers_the_held_out_loss(photos, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        card = finetune(str(photos), tmp_path / "m", _cfg(), log=_quiet)
    v = card["validation"]
    assert [h["epoch"] for h in v["history"]] == [0, 1, 2, 3]
    assert min(h["loss"] for h in v["history"][1:]) < v["history"][0]["loss"]  # better than the probe alone
    assert v["best"]["score"] == max(h["score"] for h in v["history"])  # the epoch kept is the best held-out
    assert {"knn_median_km", "knn_acc_750km", "loss"} <= set(v["best"])
    assert card["training"]["validation"] > 0 and card["training"]["group_column"] == "owner"


def _interrupted(photos: Path, out: Path, cfg: FinetuneConfig, monkeypatch) -> None:
    """A run killed after its last epoch's checkpoint, before the card: what a resumed run starts from."""
    import geo.finetune.runner as runner

    def killed(*_, **__):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(runner, "write_card", killed)
        with pytest.raises(KeyboardInterrupt):
            finetune(str(photos), out, cfg, log=_quiet)


def test_checkpoints_are_atomic_and_a_resumed_run_ends_where_an_uninterrupted_one_does(photos, tmp_path, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = finetune(str(photos), tmp_path / "whole", _cfg(epochs=2), log=_quiet)
        # a finished run leaves the card and the weights, not its 40 MB checkpoint (issue 27, finding 18)
        assert sorted(p.name for p in (tmp_path / "whole").iterdir()) == ["geo-model.json", "model.safetensors"]
        _interrupted(photos, tmp_path / "parts", _cfg(epochs=1), monkeypatch)
        assert json.loads((tmp_path / "parts" / "checkpoint" / "state.json").read_text())["history"][-1]["epoch"] == 1
        lines: list[str] = []
        parts = finetune(str(photos), tmp_path / "parts", _cfg(epochs=2), log=lines.append)
    assert any("resumed after epoch 1" in x for x in lines)
    assert not (tmp_path / "parts" / "checkpoint").exists()
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "parts" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-6), k
    assert [h["loss"] for h in whole["validation"]["history"]] == pytest.approx(
        [h["loss"] for h in parts["validation"]["history"]], abs=1e-5)
    assert not list(tmp_path.rglob("*.tmp"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _interrupted(photos, tmp_path / "other", _cfg(epochs=1), monkeypatch)
        with pytest.raises(ValueError, match="checkpoint of another run"):
            finetune(str(photos), tmp_path / "other", _cfg(epochs=2, smoothing_km=500.0), log=_quiet)


def test_a_finetuned_model_dir_is_a_backbone_for_build_and_query(photos, tmp_path):
    """The tuned settings come from --config (TOML), the options given on the command line win over it."""
    (tmp_path / "s.toml").write_text('batch_size = 8\nfreeze_until = "blocks.3"\nepochs = 4\n')
    r = CliRunner().invoke(app, ["finetune", str(photos), "--out", str(tmp_path / "model"), "--backbone", TINY,
                                 "--epochs", "1", "--config", str(tmp_path / "s.toml"), "-q", "--json"])
    assert r.exit_code == 0, r.output
    card = json.loads(r.stdout)
    assert {k: card["training"]["config"][k] for k in ("batch_size", "freeze_until", "epochs", "backbone")} == {
        "batch_size": 8, "freeze_until": "blocks.3", "epochs": 1, "backbone": TINY}
    assert card["training"]["trainable_parameters"] < sum(
        p.numel() for p in load_backbone(TINY, device="cpu").model.parameters())
    bundle = tmp_path / "bundle"
    r = CliRunner().invoke(app, ["build-index", str(photos), "--out", str(bundle), "--backbone",
                                 str(tmp_path / "model"), "--workers", "0", "-q", "--skip", "cells", "--skip",
                                 "gallery", "--skip", "fusion"])
    assert r.exit_code == 0, r.output
    spec = json.loads((bundle / "manifest.json").read_text())["backbone"]
    assert spec["name"] == "finetuned:model"  # its name and sha256, not where it was (issue 27, finding 18)
    assert spec["weights"]["sha256"] == card["weights_sha256"]
    r = CliRunner().invoke(app, ["query", str(photos.parent / "p5.jpg"), "--index", str(bundle), "--json"])
    answer = json.loads(r.stdout)
    assert answer["error"] is None and answer["neighbors"][0]["id"].endswith("p5.jpg")
    assert answer["neighbors"][0]["similarity"] == pytest.approx(1.0, abs=1e-4)


def test_regression_and_gps_contrastive_terms_train_with_the_cells(photos, tmp_path, monkeypatch):
    """GeoCLIP's image-to-GPS term (its published location encoder, frozen) and the unit-sphere regression
    term join the cell loss; their heads live in the checkpoint, not in the model a bundle uses."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _interrupted(photos, tmp_path / "m", _cfg(epochs=1, regression_weight=0.5, contrastive_weight=0.5),
                     monkeypatch)
        state = load_file(str(tmp_path / "m" / "checkpoint" / "state.safetensors"))  # the heads live here
        card = finetune(str(photos), tmp_path / "m", _cfg(epochs=1, regression_weight=0.5, contrastive_weight=0.5),
                        log=_quiet)
    assert all(np.isfinite(h["loss"]) for h in card["validation"]["history"])
    assert any(k.startswith("heads.proj.") for k in state) and any(k.startswith("heads.xyz.") for k in state)
    assert not any(k.startswith(("proj.", "xyz.")) for k in load_file(str(tmp_path / "m" / "model.safetensors")))


def test_finetuning_on_semantic_cells_classifies_into_country_cells(photos, tmp_path):
    """PIGEON fine-tunes on semantic geocells: the cells are the training photos' countries (four places in
    four countries here), and the run records which partitioner it used."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        card = finetune(str(photos), tmp_path / "m", _cfg(epochs=1, partitioner="semantic"), log=_quiet)
    assert card["training"]["config"]["partitioner"] == "semantic"
    assert card["training"]["cells"]["fine"] >= 3  # at least one cell per country with training photos
    assert [h["epoch"] for h in card["validation"]["history"]] == [0, 1]
    (tmp_path / "s.json").write_text('{"partitioner": "bottomup"}')
    r = CliRunner().invoke(app, ["finetune", str(photos), "--out", str(tmp_path / "x"), "--config", str(tmp_path / "s.json")])
    assert r.exit_code == 2 and "s.json: partitioner takes adaptive or semantic" in r.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name, text, message", [
    ("s.toml", 'smoothing_kms = 250.0\n', "s.toml: unknown setting 'smoothing_kms' (did you mean 'smoothing_km'?)"),
    ("s.json", '{"lr": 1e-5, "colour": 1}', "s.json: unknown setting 'colour'"),
    ("s.json", '{"epochs": "5"}', "s.json: epochs must be int, not '5'"),
    ("s.json", '{"augment": 0}', "s.json: augment must be bool, not 0"),
    ("s.toml", 'patience = 0\n', "s.toml: patience must be at least 1, not 0"),
    ("s.toml", 'lr = \n', "s.toml: not valid TOML"),
    ("s.json", '[1]', "s.json: must hold a table of settings"),
])
def test_a_config_file_is_checked_key_by_key_before_anything_runs(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError) as e:
        read_config(tmp_path / name)
    assert message in str(e.value) and str(tmp_path) in str(e.value)
    r = CliRunner().invoke(app, ["finetune", str(tmp_path / "none.csv"), "--out", str(tmp_path / "m"),
                                 "--config", str(tmp_path / name)])
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output


def test_a_config_file_sets_any_field_and_keeps_the_rest_at_their_defaults(tmp_path):
    (tmp_path / "s.json").write_text('{"lr": 1, "freeze_until": null, "regression_weight": 0.5, "augment": false}')
    cfg = read_config(tmp_path / "s.json", FinetuneConfig(freeze_until="blocks.3", epochs=9))
    assert cfg == FinetuneConfig(lr=1.0, regression_weight=0.5, augment=False, epochs=9)
    assert isinstance(cfg.lr, float)


def _model_dir(tmp_path: Path) -> Path:
    """A MODEL_DIR as `geo finetune` leaves it (card and weights), without the training: the base's own tensors."""
    from safetensors.torch import save_file

    from geo.store.atomic import sha256_file

    out = tmp_path / "model"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in load_backbone(TINY, device="cpu").model.state_dict().items()},
              out / "model.safetensors")
    (out / "geo-model.json").write_text(json.dumps({
        "format": "geo-finetuned-model", "base": TINY, "weights": "model.safetensors",
        "weights_sha256": sha256_file(out / "model.safetensors")}))
    return out


def test_a_model_dir_whose_weights_changed_since_its_card_is_refused_at_build(photos, tmp_path):
    """Issue 27 finding 2: 64 flipped bytes in model.safetensors built a bundle with rc 0."""
    model = _model_dir(tmp_path)
    assert load_backbone(str(model), device="cpu").weights["sha256"]  # as written, it loads
    data = bytearray((model / "model.safetensors").read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])  # tensor bytes: the header still parses
    (model / "model.safetensors").write_bytes(bytes(data))
    r = CliRunner().invoke(app, ["build-index", str(photos), "--out", str(tmp_path / "bundle"), "--backbone",
                                 str(model), "--workers", "0", "-q", "--skip", "cells", "--skip", "gallery",
                                 "--skip", "fusion"])
    assert r.exit_code == 2, r.output
    assert "model.safetensors: sha256" in r.output and "geo-model.json records" in r.output
    assert not (tmp_path / "bundle" / "manifest.json").exists()
