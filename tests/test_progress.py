"""Long work shows a bar with rate and ETA; --quiet silences it; per-epoch metrics appear only with --verbose."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from synthetic import config_file, synthetic_gallery, write_embeddings
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
    # the other two settings on a build that trains a GPS gallery alone (seconds, not a whole build again)
    emb = write_embeddings(synthetic_gallery(120), tmp_path / "e.parquet")
    small = ["build-index", "--embeddings", str(emb), "--backbone", "toy24", "--skip", "cells", "--skip", "fusion",
             "--config", str(config)]
    q = CliRunner().invoke(app, [*small, "--out", str(tmp_path / "b"), "--quiet"])
    assert q.exit_code == 0 and "gallery rounds" not in q.output and "gallery epoch" not in q.output, q.output
    plain = CliRunner().invoke(app, [*small, "--out", str(tmp_path / "c")])
    assert plain.exit_code == 0, plain.output
    assert "gallery rounds (early stopping ends sooner)" in plain.output and "gallery epoch 1:" not in plain.output


def test_off_a_terminal_a_bar_prints_whole_lines_not_redrawn_frames(capsys, monkeypatch):
    """Why (issue 27, finding 16): tqdm's restarting frames flooded a log file with \\r-joined redraws."""
    import geo.core.progress as progress

    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False, raising=False)
    with showing(bars=True):
        b = bar(1000, "embed", unit="img")
        for i in range(1000):
            b.update()
            if i in (10, 500):
                b.set_postfix_str(f"shard {i}")
        b.close()
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and all(line.startswith("embed: ") for line in lines), err
    assert len(lines) == 2  # the start and the end: no line per update or per label within 10 s
    assert lines[-1].startswith("embed: 100% 1000/1000") and "img/s" in lines[-1] and "shard 500" in lines[-1]
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)  # a slow loop: each label shows once due
    with showing(bars=True):
        b = bar(3, "fusion folds", unit="step")
        for f in range(3):
            b.set_postfix_str(f"fold {f + 1}/3")
            b.update()
        b.close()
    lines = capsys.readouterr().err.splitlines()
    assert [x for x in lines if "fold 2/3" in x] and lines[-1].endswith("fold 3/3"), lines


def test_a_bar_inside_another_counts_in_its_label(capsys):
    """Why (issue 27, finding 16): fusion's fold bar sat on "fold 1/3: GPS gallery" for minutes while the fold's own
    rounds, hidden, ran; now they count in its label."""
    from geo.core.progress import inside

    with showing(bars=True):
        outer = bar(3, "fusion folds", unit="step")
        outer.set_postfix_str("fold 1/3: GPS gallery")
        with inside(outer, lambda: "fold 1/3: GPS gallery"):
            inner = bar(40, "gallery rounds (early stopping ends sooner)", unit="round")
            inner.update(3)
            inner.set_postfix_str("score 0.5")
            inner.close()
        assert outer.postfix == "fold 1/3: GPS gallery, gallery rounds 3/40 (score 0.5)"
        outer.close()
    assert "gallery rounds (early" not in capsys.readouterr().err  # no bar of its own
