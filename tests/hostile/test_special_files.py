"""Special and oversized files anywhere geo reads: refused by kind or size before a byte is read, never
read whole, never waited on; one bad input costs itself alone."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from conftest import cli, one_line_error, photo

from geo.core.files import FileRefused, read_capped


def _special(tmp_path: Path, kind: str) -> Path:
    """A path of the given kind, named like a photo."""
    p = tmp_path / f"{kind}.jpg"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "devzero":
        p.symlink_to("/dev/zero")
    elif kind == "devnull":
        p.symlink_to("/dev/null")
    elif kind == "huge":  # sparse: 2 GiB on paper, nothing on disk
        with open(p, "wb") as f:
            f.truncate(2 << 30)
    elif kind == "dangling":
        p.symlink_to(tmp_path / "nowhere.jpg")
    return p


REASONS = {"fifo": "FIFO", "devzero": "character device", "devnull": "character device",
           "huge": "over the 1,073,741,824-byte limit", "dangling": "file not found"}


@pytest.mark.parametrize("kind", list(REASONS))
def test_a_query_argument_is_refused_by_kind_or_size_and_the_others_answered(bundle, tmp_path, kind):
    """Why #2: a symlink to /dev/zero reached 5 GB RSS in 7 s; a FIFO blocked forever."""
    bad = _special(tmp_path, kind)
    r = cli("query", bad, photo(3), "--index", bundle, "--json", timeout=60)
    assert r.exit_code == 3, r.output  # some inputs failed, the others answered
    answers = [json.loads(line) for line in r.stdout.splitlines()]
    assert answers[0]["error"] and REASONS[kind] in answers[0]["error"], answers[0]
    assert answers[1]["error"] is None and answers[1]["lat"] is not None


@pytest.mark.parametrize("kind", ["fifo", "devzero", "huge"])
def test_a_manifest_row_is_an_error_row_and_the_build_goes_on(tmp_path, kind):
    bad = _special(tmp_path, kind)
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": [str(bad), str(photo(0)), str(photo(1))], "lat": [1.0, 2.0, 3.0],
                  "lon": [1.0, 2.0, 3.0]}).to_csv(manifest, index=False)
    r = cli("build-index", manifest, "--out", tmp_path / "b", "--workers", "0", "-q", timeout=300)
    assert r.exit_code == 0 and "2 photos indexed, 1 failed" in r.output, r.output
    errors = cli("sql", "SELECT reason FROM errors", "--bundle", tmp_path / "b", "--json")
    assert REASONS[kind] in json.loads(errors.stdout)[0]["reason"]


@pytest.mark.parametrize("command", [
    ["build-index", "{bad}", "--out", "{tmp}/b"],
    ["build-index", "--embeddings", "{bad}", "--out", "{tmp}/b"],
    ["query", "--embeddings", "{bad}", "--index", "{bundle}"],
    ["bench", "score", "{bad}"],
    ["sql", "SELECT 1", "-p", "{bad}"],
    ["report", "{bad}", "--out", "{tmp}/r"],
])
@pytest.mark.parametrize("kind", ["fifo", "devzero"])
def test_a_special_file_given_as_a_table_is_refused_without_waiting(bundle, tmp_path, command, kind):
    bad = _special(tmp_path, kind).rename(tmp_path / f"{kind}.parquet")
    args = [a.format(bad=bad, tmp=tmp_path, bundle=bundle) for a in command]
    r = cli(*args, timeout=60)
    one_line_error(r, str(bad), REASONS[kind])
    assert not (tmp_path / "b").exists()


def test_the_cap_is_configurable_and_applies_to_photos(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("GEO_MAX_FILE_BYTES", "1000")
    r = cli("query", photo(3), "--index", bundle, "--json")
    assert "over the 1,000-byte limit" in json.loads(r.stdout)["error"]
    monkeypatch.setenv("GEO_MAX_FILE_BYTES", "lots")
    one_line_error(cli("query", photo(3), "--index", bundle), "GEO_MAX_FILE_BYTES='lots'")


def test_a_file_read_stops_at_the_cap(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"x" * 5000)
    assert read_capped(p, 5000) == b"x" * 5000
    with pytest.raises(FileRefused, match="over the 4,999-byte limit"):
        read_capped(p, 4999)


def test_a_file_longer_than_its_size_said_is_read_whole_or_refused_at_the_cap(tmp_path, monkeypatch):
    """The read asks for one byte past the size fstat gave: a file that grew meanwhile (here: fstat says 10
    bytes of 5,000) is read on to the end, or refused past the cap, never cut at the size it had."""
    p = tmp_path / "grows.bin"
    p.write_bytes(b"y" * 5000)
    fstat = os.fstat
    monkeypatch.setattr(os, "fstat", lambda fd: os.stat_result((*fstat(fd)[:6], 10, *fstat(fd)[7:10])))
    assert read_capped(p, 6000) == b"y" * 5000
    with pytest.raises(FileRefused, match="grew past the 4,999-byte limit"):
        read_capped(p, 4999)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux's /proc")
def test_a_proc_file_whose_size_says_zero_is_read_whole():
    assert b"Pid:" in read_capped("/proc/self/status")
