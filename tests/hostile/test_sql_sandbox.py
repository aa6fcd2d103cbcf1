"""`geo sql`: a bundle's errors and photo metadata as tables, and a query that can touch nothing else."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from geo.cli import app

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "osv5m"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """Three photos and one missing file: a kNN-only bundle whose errors.parquet has a row."""
    root = tmp_path_factory.mktemp("sql")
    photos = sorted((EXAMPLES / "gallery").glob("*.jpg"))[:3]
    lines = ["path,lat,lon,owner"] + [f"{p},{10 + i},{20 + i},o{i}" for i, p in enumerate(photos)]
    lines.append(f"{root / 'gone.jpg'},1,2,o9")
    (root / "m.csv").write_text("\n".join(lines) + "\n")
    r = CliRunner().invoke(app, ["build-index", str(root / "m.csv"), "--out", str(root / "b"), "--workers", "0", "-q"])
    assert r.exit_code == 0, r.output
    return root / "b"


def _sql(*args: str):
    return CliRunner().invoke(app, ["sql", *args])


def test_bundle_errors_and_photo_metadata_are_tables(bundle):
    r = _sql("SELECT path, stage, reason FROM errors", "--bundle", str(bundle), "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert len(rows) == 1 and rows[0]["path"].endswith("gone.jpg") and "not found" in rows[0]["reason"]
    r = _sql("SELECT * FROM embeddings ORDER BY lat", "--bundle", str(bundle), "--json")
    rows = json.loads(r.stdout)
    assert [row["lat"] for row in rows] == [10, 11, 12] and "embedding" not in rows[0] and rows[0]["owner"] == "o0"


@pytest.mark.parametrize("query", [
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM glob('/etc/*')",
    "COPY (SELECT 1) TO '{out}'",
    "ATTACH '{out}' AS other",
    "INSTALL httpfs",
    "SELECT * FROM read_csv('https://example.org/x.csv')",
    "SET enable_external_access = true",
])
def test_the_query_reads_and_writes_nothing_else(bundle, tmp_path, query):
    out = tmp_path / "written"
    r = _sql(query.format(out=out), "--bundle", str(bundle))
    assert r.exit_code == 2 and "error: query failed" in r.output
    assert not out.exists()


def test_an_empty_query_is_a_clear_error(bundle):
    r = _sql("  ", "--bundle", str(bundle))
    assert r.exit_code == 2 and "empty query" in r.output
