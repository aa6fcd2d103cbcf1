"""Every query argument is accounted for in the output, and no output path lands inside a bundle."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from geo.cli import app

QUERIES = sorted((Path(__file__).resolve().parents[1] / "examples" / "osv5m" / "queries").glob("*.jpg"))
QUERY = QUERIES[0]


def test_a_folder_without_images_gets_its_own_answer(cli_bundle, tmp_path):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(app, ["query", str(tmp_path / "empty"), str(QUERY), "--index", str(cli_bundle[1]), "--json"])
    answers = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.exit_code == 3 and len(answers) == 2  # some inputs failed: a documented code, and the line names them
    assert f"error: 1 of 2 inputs could not be answered: {tmp_path / 'empty'} (a directory" in r.output
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


def test_locate_always_answers_with_a_list_and_locate_one_with_one_answer(cli_bundle, tmp_path, monkeypatch):
    from geo.query.index import open_index

    index = open_index(cli_bundle[1])
    listed = index.locate(str(QUERY))
    assert isinstance(listed, list) and len(listed) == 1 and listed[0].image == str(QUERY)
    assert index.locate_one(QUERY).to_dict() == listed[0].to_dict()
    (tmp_path / "two").mkdir()
    for q in QUERIES[:2]:
        shutil.copy(q, tmp_path / "two" / q.name)
    folder = index.locate(tmp_path / "two")  # a folder: one answer per photo in it, in order
    assert [a.image for a in folder] == [str(tmp_path / "two" / q.name) for q in QUERIES[:2]]
    one_match = str(tmp_path / "two" / f"{QUERIES[1].stem}.*")  # a glob that finds exactly one photo
    found = index.locate_one(one_match)  # alone, not batched with another photo: equal up to float rounding
    assert found.image == folder[1].image and (found.lat, found.lon) == pytest.approx((folder[1].lat, folder[1].lon))
    missing = index.locate_one(tmp_path / "missing.jpg")  # one photo that cannot be read: its answer says why
    assert missing.error and missing.lat is None
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(index, "embed", lambda *a, **k: pytest.fail("embedded before the argument was checked"))
    for arg, words in ((tmp_path / "two", "2 photos"), (tmp_path / "empty", "no photo"),
                       (str(tmp_path / "nothing-*.jpg"), "no photo")):
        with pytest.raises(ValueError, match=words):
            index.locate_one(arg)
    with pytest.raises(TypeError, match="use locate"):
        index.locate_one([str(QUERY)])
