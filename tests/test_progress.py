"""Long work shows a bar with rate and ETA; --quiet silences it; per-epoch metrics appear only with --verbose."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from synthetic import config_file
from typer.testing import CliRunner

from geo.cli import app
from geo.core.progress import bar, detail, showing

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "osv5m"


def test_bars_follow_the_setting_and_detail_needs_verbose(capsys):
    lines: list[str] = []
    with showing(bars=True, verbose=False):
        b = bar(3, "work", unit="step")
        b.update(3)
        b.close()
        detail(lines.append, "epoch 1: loss 0.5")
    assert "work: 100%" in capsys.readouterr().err and lines == []
    with showing(bars=False, verbose=True):
        b = bar(3, "hidden")
        b.update(3)
        b.close()
        detail(lines.append, "epoch 1: loss 0.5")
    assert "hidden" not in capsys.readouterr().err and lines == ["epoch 1: loss 0.5"]


def test_build_shows_fusion_heads_and_gallery_progress_and_quiet_hides_it(tmp_path):
    df = pd.read_csv(EXAMPLES / "gallery.csv", dtype={"id": str}).head(51)
    df["path"] = [str(EXAMPLES / p) for p in df["path"]]
    df["owner"] = [f"o{i % 9}" for i in range(len(df))]
    df.to_csv(tmp_path / "g.csv", index=False)
    config = config_file(tmp_path / "c.json", {"gallery": {"epochs": 2}})
    args = ["build-index", str(tmp_path / "g.csv"), "--workers", "0", "--config", str(config)]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a"), "--verbose"])
    assert r.exit_code == 0, r.output
    for shown in ("fusion folds: 100%", "fold 3/3", "cell heads (early stopping ends sooner)",
                  "gallery rounds (early stopping ends sooner)", "step/s", "gallery epoch 1:"):
        assert shown in r.output, shown
    q = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b"), "--quiet"])
    assert q.exit_code == 0 and "fusion folds" not in q.output and "gallery epoch" not in q.output
    plain = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "c")])
    assert "fusion folds: 100%" in plain.output and "gallery epoch 1:" not in plain.output  # no flood by default
