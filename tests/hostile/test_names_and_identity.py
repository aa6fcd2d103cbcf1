"""Names the file system allows and identities that must not double: any name can be embedded and reported,
one photo is one row, every argument is accounted for, and output never lands inside a bundle."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import cli, manifest_of, one_line_error, photo

from geo.data.manifest import read_manifest

NAMES = {"latin-1": b"caf\xe9.jpg", "broken utf-8": b"\xe2\x28\xa1.jpg", "newline": b"two\nlines.jpg",
         "spaces and dash": b"-rf  x .jpg", "unicode": "東京 タワー.jpg".encode()}


def _put(folder: Path, raw: bytes, src: Path) -> str:
    """Copy a photo under a name given as bytes; returns the name as Python sees it."""
    folder.mkdir(exist_ok=True)
    name = os.fsdecode(os.fsencode(str(folder)) + b"/" + raw)
    shutil.copy(src, name)
    return name


@pytest.mark.parametrize("label", list(NAMES))
def test_any_file_name_is_answered_and_reported(bundle, tmp_path, label):
    """Why #3: one non-UTF-8 name aborted a build naming no file; `geo query --out` crashed on one."""
    name = _put(tmp_path / "q", NAMES[label], photo(3))
    out = tmp_path / "answers.parquet"
    r = cli("query", tmp_path / "q", "--index", bundle, "--out", out)
    assert r.exit_code == 0, r.output
    shown = r.output.splitlines()[0]
    assert "near-duplicate" in r.output and ("\\x" in shown or label in ("newline", "spaces and dash", "unicode"))
    stored = cli("sql", "SELECT query_id, error FROM predictions", "-p", out, "--json")
    row = json.loads(stored.stdout)[0]
    assert row["error"] is None and os.fsencode(name).decode("utf-8", "backslashreplace") == row["query_id"]


def test_a_folder_with_a_non_utf8_name_builds_and_lists_it_escaped(tmp_path, cli_bundle):
    manifest, _ = cli_bundle
    gallery = pd.read_csv(manifest, dtype={"id": str}).head(4)
    rows = []
    for i, (src, raw) in enumerate(zip(gallery["path"], [b"caf\xe9.jpg", b"ok.jpg", b"\xff.jpg", b"x.jpg"])):
        rows.append((os.fsencode(_put(tmp_path / "photos", raw, Path(src))).decode("utf-8", "backslashreplace"),
                     gallery["latitude"][i], gallery["longitude"][i]))
    m = tmp_path / "m.csv"
    pd.DataFrame(rows, columns=["path", "lat", "lon"]).to_csv(m, index=False)
    r = cli("build-index", m, "--out", tmp_path / "b", "--workers", "0", "-q")
    assert r.exit_code == 0 and "4 photos indexed, 0 failed" in r.output, r.output
    ids = json.loads(cli("sql", "SELECT id FROM embeddings", "--bundle", tmp_path / "b", "--json").stdout)
    assert {Path(x["id"]).name for x in ids} == {"caf\\xe9.jpg", "ok.jpg", "\\xff.jpg", "x.jpg"}


# ---------------------------------------------------------------- one photo, one row
def test_the_same_photo_under_two_paths_is_indexed_once(tmp_path, monkeypatch):
    """Why #10: `./x.jpg` and its absolute path were indexed twice with conflicting coordinates."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(photo(0), tmp_path / "x.jpg")
    (tmp_path / "link.jpg").symlink_to(tmp_path / "x.jpg")
    m = tmp_path / "m.csv"
    m.write_text(f"path,lat,lon\n./x.jpg,10,20\n{tmp_path / 'x.jpg'},30,40\nlink.jpg,50,60\n")
    r = read_manifest(m)
    assert len(r.df) == 1 and r.df["lat"].tolist() == [10]
    assert [e["reason"] for e in r.errors] == ["row 2: the same file as row 1 (" + str(tmp_path / "x.jpg") + ")",
                                               "row 3: the same file as row 1 (" + str(tmp_path / "x.jpg") + ")"]


def test_an_exif_folder_with_a_symlinked_twin_indexes_it_once(tmp_path, textured):
    from test_manifest import _gps_photo

    _gps_photo(textured, tmp_path / "a.jpg", 48.5, 2.25)
    (tmp_path / "b.jpg").symlink_to(tmp_path / "a.jpg")
    r = read_manifest(tmp_path)
    assert r.df["id"].tolist() == ["a.jpg"] and r.errors[0]["reason"].startswith("the same file as")


# ---------------------------------------------------------------- arguments and outputs
@pytest.mark.parametrize("args,words", [
    (["--crops", "2"], "--crops must be 1, 3 or 5"),
    (["--mode", "psychic"], "mode 'psychic' is not available"),
    (["--format", "xml"], "--format must be text, json or geojson"),
])
def test_a_bad_option_is_one_clear_line(bundle, args, words):
    one_line_error(cli("query", photo(3), "--index", bundle, *args), words)


def test_every_query_argument_is_accounted_for(bundle, tmp_path):
    (tmp_path / "empty").mkdir()
    r = cli("query", photo(3), tmp_path / "empty", tmp_path / "missing.jpg", str(tmp_path / "*.png"),
            "--index", bundle, "--json")
    answers = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(answers) == 4 and answers[0]["error"] is None
    assert [a["error"] for a in answers[1:]] == ["a directory with no image files in it", "file not found",
                                                 "file not found"]
    assert r.exit_code == 3 and "error: 3 of 4 inputs could not be answered: " in r.output, r.output  # finding 16


@pytest.mark.parametrize("target", ["manifest.json", "index/knn.faiss", "new.parquet", "cells/x.geojson"])
def test_output_is_never_written_inside_a_bundle(bundle, target):
    """Why #10: `geo query --out` aimed at a bundle's manifest.json destroyed the bundle."""
    before = manifest_of(bundle)
    one_line_error(cli("query", photo(3), "--index", bundle, "--out", bundle / target), "is inside the bundle")
    assert manifest_of(bundle) == before and cli("info", bundle, "--verify").exit_code == 0
