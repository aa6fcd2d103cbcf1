"""Every gallery size builds: below the trained stages' minimum they are skipped with a line, never a crash.

Real photos (the vendored OSV-5M gallery, nine "photographers"), at the sizes around the 50-photo
threshold where a user once met `stack expects a non-empty TensorList` in the cell heads.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from synthetic import config_file
from typer.testing import CliRunner

from geo.cli import app
from geo.models.heads import CellHeads
from geo.stages.cells.train import _loss, _val_loss
from geo.store.bundle import open_bundle

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "osv5m"
QUERY = sorted((EXAMPLES / "queries").glob("*.jpg"))[0]


@pytest.mark.parametrize("n", [1, 2, 49, 50, 51])
def test_gallery_of_n_photos_builds_and_answers(n, tmp_path):
    df = pd.read_csv(EXAMPLES / "gallery.csv", dtype={"id": str}).head(n)
    df["path"] = [str(EXAMPLES / p) for p in df["path"]]
    df["owner"] = [f"o{i % 9}" for i in range(len(df))]
    df.to_csv(tmp_path / "g.csv", index=False)
    out = tmp_path / "bundle"
    r = CliRunner().invoke(app, ["build-index", str(tmp_path / "g.csv"), "--out", str(out), "--workers", "0",
                                 "--config", str(config_file(tmp_path / "c.json", {"gallery": {"epochs": 1}}))])
    assert r.exit_code == 0, r.output
    stages = set(open_bundle(out).manifest["stages"])
    if n < 50:
        assert "cells, gallery, fusion: skipped" in r.output and not stages & {"cells", "gallery", "fusion"}
    else:
        assert {"cells", "gallery", "fusion"} <= stages
        assert "fusion learned: knn" in r.output  # what fusion learned, in words, ends the build
    q = CliRunner().invoke(app, ["query", str(QUERY), "--index", str(out), "--json"])
    assert q.exit_code == 0 and '"lat": ' in q.stdout


def test_a_batch_with_no_photo_in_any_cell_is_a_zero_loss_not_a_crash():
    model = CellHeads(8, [3, 5])
    y = torch.full((4, 2), -1)  # every photo outside every kept cell
    loss = _loss(model, torch.randn(4, 8), y, torch.full((4,), -1), torch.randn(4, 3), [torch.randn(3, 3),
                 torch.randn(5, 3)], 0.0, 0)
    assert float(loss) == 0.0 and loss.requires_grad
    loss.backward()  # a training step over it changes nothing


def test_the_validation_loss_scored_in_blocks_is_the_loss_of_all_photos_at_once(monkeypatch):
    """Early stopping's number, scored a block of photos at a time to bound memory, is the hard-label loss of
    every validation photo together: photos outside a partition's cells and unknown scenes left out alike."""
    import geo.stages.cells.train as train

    torch.manual_seed(0)
    model = CellHeads(8, [3, 5], n_scenes=4).eval()
    x, y, s = torch.randn(50, 8), torch.stack([torch.randint(-1, 3, (50,)), torch.randint(-1, 5, (50,))], 1), \
        torch.randint(-1, 4, (50,))
    rows = torch.arange(3, 47)
    with torch.no_grad():
        whole = float(_loss(model, x[rows], y[rows], s[rows], None, None, 0.0, 4))
    monkeypatch.setattr(train, "VAL_BLOCK", 7)
    assert _val_loss(model, x, y, s, rows, 4) == pytest.approx(whole, rel=1e-6)
    no_scenes = CellHeads(8, [3, 5]).eval()
    with torch.no_grad():
        whole = float(_loss(no_scenes, x[rows], y[rows], s[rows], None, None, 0.0, 0))
    assert _val_loss(no_scenes, x, y, s, rows, 0) == pytest.approx(whole, rel=1e-6)


def test_a_folder_without_gps_is_refused_before_any_model_load_and_leaves_no_bundle(tmp_path, monkeypatch):
    import geo.pipeline

    folder = tmp_path / "photos"
    folder.mkdir()
    for q in sorted((EXAMPLES / "queries").glob("*.jpg"))[:3]:  # street photos whose EXIF has no GPS
        (folder / q.name).write_bytes(q.read_bytes())
    monkeypatch.setattr(geo.pipeline, "load_backbone", lambda *a, **k: pytest.fail("the model was loaded"))
    r = CliRunner().invoke(app, ["build-index", str(folder), "--out", str(tmp_path / "bundle")])
    assert r.exit_code == 2 and "nothing to index, 3 inputs rejected" in r.output and "no GPS" in r.output
    assert not (tmp_path / "bundle").exists()
