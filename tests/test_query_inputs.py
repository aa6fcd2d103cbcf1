"""Every query argument is accounted for in the output, and no output path lands inside a bundle."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from geo.cli import app

QUERY = sorted((Path(__file__).resolve().parents[1] / "examples" / "osv5m" / "queries").glob("*.jpg"))[0]


def test_a_folder_without_images_gets_its_own_answer(cli_bundle, tmp_path):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(app, ["query", str(tmp_path / "empty"), str(QUERY), "--index", str(cli_bundle[1]), "--json"])
    answers = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.exit_code == 0 and len(answers) == 2
    assert answers[0]["image"] == str(tmp_path / "empty") and "no image files" in answers[0]["error"]
    assert answers[1]["error"] is None


def test_out_inside_a_bundle_is_refused_and_the_bundle_survives(cli_bundle, tmp_path):
    bundle = tmp_path / "copy"
    shutil.copytree(cli_bundle[1], bundle)
    for target in (bundle / "manifest.json", bundle / "index" / "preds.parquet"):
        r = CliRunner().invoke(app, ["query", str(QUERY), "--index", str(bundle), "--out", str(target)])
        assert r.exit_code == 2 and "inside the bundle" in r.output
    r = CliRunner().invoke(app, ["bench", "custom", "--index", str(bundle), "--images", "/", "--meta", "x.csv",
                                 "--out", str(bundle / "p.parquet")])
    assert r.exit_code == 2 and "inside the bundle" in r.output
    assert CliRunner().invoke(app, ["info", str(bundle), "--verify"]).exit_code == 0
