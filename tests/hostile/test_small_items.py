"""The smaller items of issue 27 finding 11: values the server refuses, the CLI refused too; bad rows and
files named by file and column; what people read cannot be forged by an id."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cli, one_line_error, photo

from geo.store.predictions import write_predictions


@pytest.mark.parametrize("value", ["2", "-0.5", "nan", "inf"])
def test_min_confidence_outside_zero_one_is_refused(bundle, value):
    """Why: the CLI took 2 and nan (abstain on everything, or on nothing) where the server answers 422."""
    r = cli("query", photo(3), "--index", bundle, "--min-confidence", value)
    one_line_error(r, "--min-confidence", "0 to 1")


def _predictions(tmp_path: Path, name: str = "p.parquet", **cols) -> Path:
    """A tiny geo predictions file (three photos near Paris), with columns replaced by ``cols``."""
    df = pd.DataFrame({"query_id": ["a", "b", "c"], "true_lat": [48.85] * 3, "true_lon": [2.35] * 3,
                       "pred_lat": [48.8, 48.9, 49.0], "pred_lon": [2.3, 2.4, 2.5], "mode": ["knn"] * 3,
                       "confidence": [0.2, 0.5, np.nan]})
    for k, v in cols.items():
        df[k] = v
    return write_predictions(tmp_path / name, df)


@pytest.mark.parametrize("bad", [-3.0, 7.0, np.inf])
@pytest.mark.parametrize("command", [("report",), ("bench", "score")])
def test_confidence_outside_zero_one_is_refused(tmp_path, bad, command):
    """Why: -3 or 7 went into the calibration table and the score as if meant; NaN (none reported) stays."""
    f = _predictions(tmp_path, confidence=[0.2, bad, np.nan])
    r = cli(*command, f, *(["--out", tmp_path / "rep"] if command == ("report",) else []))
    one_line_error(r, str(f), "confidence", "0..1")
    fine = cli(*command, _predictions(tmp_path, "ok.parquet"), "--no-ci",
               *(["--out", tmp_path / "rep"] if command == ("report",) else []))
    assert fine.exit_code == 0, fine.output


def test_confidence_outside_zero_one_in_a_csv_is_refused(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("id,true_lat,true_lon,pred_lat,pred_lon,confidence\nx,1,2,3,4,0.5\ny,1,2,3,4,\nz,1,2,3,4,7\n")
    one_line_error(cli("bench", "score", f), str(f), "confidence", "0..1")


def test_bench_score_refuses_duplicate_ids(tmp_path):
    """Why: a photo listed twice counted twice in the median and the accuracies."""
    f = _predictions(tmp_path, query_id=["a", "b", "a"])
    one_line_error(cli("bench", "score", f), str(f), "duplicate", "'a'")
    csv = tmp_path / "p.csv"
    csv.write_text("id,true_lat,true_lon,pred_lat,pred_lon\nx,1,2,3,4\nx,1,2,3,4\n")
    one_line_error(cli("bench", "score", csv), str(csv), "duplicate", "'x'")
    modes = _predictions(tmp_path, "modes.parquet", query_id=["a", "a", "b"], mode=["knn", "cells", "knn"])
    assert cli("bench", "score", modes, "--no-ci").exit_code == 0  # one photo in two modes is not a duplicate


def test_report_on_an_empty_file_says_so(tmp_path):
    """Why: a 0-row file was answered with a Python list repr ([PosixPath('...')]) and no reason."""
    f = write_predictions(tmp_path / "empty.parquet", pd.DataFrame(columns=["query_id", "true_lat", "true_lon",
                                                                              "pred_lat", "pred_lon"]))
    r = cli("report", f, "--out", tmp_path / "rep")
    one_line_error(r, str(f), "no rows")
    assert "PosixPath" not in r.output and "[" not in r.output, r.output


def _bad_text_part(path: Path, df: pd.DataFrame, column: str) -> Path:
    """Write ``df`` with ``column`` holding bytes that are not UTF-8 under a string type: a damaged part that
    pyarrow opens and fails only at the conversion, with a message naming no file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.Table.from_pandas(df, preserve_index=False)
    raw = b"\xff\xfe" * len(df)
    bad = pa.Array.from_buffers(pa.string(), len(df), [None, pa.py_buffer(np.arange(0, 2 * len(df) + 1, 2,
                                                                                       dtype=np.int32).tobytes()),
                                                       pa.py_buffer(raw)])
    pq.write_table(t.set_column(t.column_names.index(column), column, bad), path)
    return path


def test_a_damaged_part_in_a_folder_is_named(bundle, tmp_path):
    """Why: a damaged part of an --embeddings or predictions folder was reported by pyarrow's words alone."""
    emb = pd.read_parquet(sorted((bundle / "embeddings").glob("part-*.parquet"))[0])
    folder = tmp_path / "emb"
    folder.mkdir()
    emb.to_parquet(folder / "b.parquet")
    (folder / "a.parquet").write_bytes((folder / "b.parquet").read_bytes()[:200])  # truncated: cannot open
    r = cli("query", "--embeddings", folder, "--index", bundle)
    one_line_error(r, str(folder / "a.parquet"))
    (folder / "a.parquet").unlink()
    _bad_text_part(folder / "c.parquet", emb, "id")  # opens, fails at the conversion
    one_line_error(cli("query", "--embeddings", folder, "--index", bundle), str(folder / "c.parquet"))
    preds = tmp_path / "preds"
    preds.mkdir()
    good = pd.read_parquet(_predictions(preds, "a.parquet"))
    _bad_text_part(preds / "b.parquet", good, "query_id")
    one_line_error(cli("report", preds, "--out", tmp_path / "rep"), str(preds / "b.parquet"))


def test_an_out_error_names_the_path_asked_for(tmp_path):
    """Why: `--out` onto a folder said "Is a directory: '.p.parquet.x1y2.tmp' -> ..." naming our hidden temp file."""
    f = _predictions(tmp_path)
    target = tmp_path / "taken.parquet"
    target.mkdir()
    r = cli("bench", "score", f, "--out", target)
    one_line_error(r, str(target))
    assert ".tmp" not in r.output, r.output
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # and nothing left behind


def test_exif_gps_without_a_reference_or_at_null_island_is_an_error_row(tmp_path, textured):
    """Why: a missing GPSLatitudeRef/GPSLongitudeRef was read as N/E (a Rio photo indexed in the Atlantic off
    Africa), and 0, 0, a camera's default without a fix, was indexed as a place in the Gulf of Guinea."""
    from fractions import Fraction as F

    from PIL import Image

    from geo.data.manifest import read_manifest

    def put(name: str, fields: dict) -> None:
        exif = Image.Exif()
        exif.get_ifd(0x8825).update(fields)
        textured(64, 48).save(tmp_path / "photos" / name, exif=exif)

    (tmp_path / "photos").mkdir()
    put("good.jpg", {1: "S", 2: (F(22), F(54), F(0)), 3: "W", 4: (F(43), F(12), F(0))})
    put("no_lat_ref.jpg", {2: (F(22), F(54), F(0)), 3: "W", 4: (F(43), F(12), F(0))})
    put("no_lon_ref.jpg", {1: "S", 2: (F(22), F(54), F(0)), 4: (F(43), F(12), F(0))})
    put("null_island.jpg", {1: "N", 2: (F(0), F(0), F(0)), 3: "E", 4: (F(0), F(0), F(0))})
    r = read_manifest(tmp_path / "photos")
    assert r.df["id"].tolist() == ["good.jpg"] and r.df["lat"].iloc[0] < 0 and r.df["lon"].iloc[0] < 0
    why = {e["path"].rsplit("/", 1)[1]: e["reason"] for e in r.errors}
    assert "GPSLatitudeRef missing" in why["no_lat_ref.jpg"]
    assert "GPSLongitudeRef missing" in why["no_lon_ref.jpg"]
    assert "null island" in why["null_island.jpg"]


def test_ids_cannot_forge_lines_of_the_human_output(bundle, tmp_path):
    """Why: an --embeddings id holding a newline (or NUL, or a terminal escape) printed a line of its own that
    read like an answer."""
    emb = pd.read_parquet(sorted((bundle / "embeddings").glob("part-*.parquet"))[0]).head(2)
    emb["id"] = ["evil\nforged.jpg: 0.00000, 0.00000  [fused]", "nul\x00\x1b[2Jid"]
    emb.to_parquet(tmp_path / "q.parquet")
    r = cli("query", "--embeddings", tmp_path / "q.parquet", "--index", bundle)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert not [x for x in lines if x.startswith("forged")], r.stdout
    assert "evil\\x0aforged.jpg" in lines[0] and "\x00" not in r.stdout and "\x1b" not in r.stdout
    assert any(x.startswith("nul\\x00\\x1b[2Jid: ") for x in lines), r.stdout
