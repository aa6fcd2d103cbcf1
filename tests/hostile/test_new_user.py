"""What a new user tripped on (issue 27, finding 16): a partial failure is a documented exit code naming the
inputs, and a thumbnail-sized photo is answered with a warning rather than without a word."""
from __future__ import annotations

import json

from conftest import cli, photo
from PIL import Image


def test_a_photo_under_64_pixels_is_answered_with_a_warning(bundle, tmp_path):
    with Image.open(photo(3)) as im:
        im.resize((16, 12)).save(tmp_path / "tiny.jpg")
        im.resize((64, 80)).save(tmp_path / "small-but-enough.jpg")
    r = cli("query", tmp_path / "tiny.jpg", tmp_path / "small-but-enough.jpg", "--index", bundle, "--json")
    assert r.exit_code == 0, r.output
    assert all(a["error"] is None for a in map(json.loads, r.stdout.splitlines()))
    warned = [x for x in r.output.splitlines() if x.startswith("warning:")]
    assert len(warned) == 1 and f"{tmp_path / 'tiny.jpg'} is 16x12 pixels, under 64" in warned[0], r.output


def test_some_inputs_failing_is_exit_code_3_naming_them_and_all_failing_is_1(bundle, tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    r = cli("query", photo(3), tmp_path / "notes.jpg", tmp_path / "gone.jpg", "--index", bundle)
    assert r.exit_code == 3, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("error:"))
    assert line.startswith("error: 2 of 3 inputs could not be answered: ") and "notes.jpg (not an image" in line
    assert "gone.jpg (file not found)" in line and "Traceback" not in r.output
    assert cli("query", tmp_path / "gone.jpg", "--index", bundle).exit_code == 1
    assert cli("query", photo(3), "--index", bundle).exit_code == 0
