"""`geo build-index`, `geo query`, `geo info` and `geo backbones` end to end on real photos (the vendored OSV-5M sample).

One index of the 66 gallery photos is built through the command line with the offline default backbone
(conftest's ``cli_bundle``), enough for every stage: embeddings, FAISS, cells, GPS gallery and fusion. These
tests check real embeddings and real stages, not mocks.
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

import geo
from geo.cli import app
from geo.core.geodesy import haversine_km

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "osv5m"
FAST_BUILD = Path(__file__).resolve().parent / "fast_build.json"  # as the cli_bundle fixture
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def gallery_csv(cli_bundle) -> Path:
    return cli_bundle[0]


@pytest.fixture(scope="module")
def index_dir(cli_bundle) -> Path:
    return cli_bundle[1]


def test_every_stage_ran_through_the_command_line(index_dir):
    stages = geo.open_index(index_dir).bundle.manifest["stages"]
    assert {"embeddings", "knn_index", "cells", "gallery", "fusion"} <= set(stages)
    assert stages["embeddings"]["ok"] == 66 and stages["fusion"]["validation"] is not None
    assert geo.open_index(index_dir).modes == ["fused", "knn", "gallery", "cells", "regression"]


def test_gallery_photo_finds_itself(index_dir, gallery_csv):
    row = pd.read_csv(gallery_csv, dtype={"id": str}).iloc[7]
    for mode in ("fused", "knn"):
        ans = geo.open_index(index_dir).locate_one(row["path"], mode=mode)
        assert ans.neighbors[0]["id"] == row["id"]
        assert ans.neighbors[0]["similarity"] == pytest.approx(1.0, abs=1e-3)
        assert haversine_km(ans.lat, ans.lon, row["latitude"], row["longitude"]) <= 0.01, mode


def _cold_query_modules(photo: str, index_dir, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh process has imported after one `geo query PHOTO --index ... --json` (which
    must answer)."""
    code = ("import json, sys; from geo.cli import app\n"
            "try: app(['query', sys.argv[1], '--index', sys.argv[2], '--json'])\n"
            "except SystemExit as e: assert e.code in (0, None), e.code\n"
            "print(json.dumps(sorted(m for m in sys.argv[3:] if m in sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code, photo, str(index_dir), *modules], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[0])["lat"] is not None
    return json.loads(r.stdout.splitlines()[-1])


def test_a_cold_query_imports_neither_timm_nor_pandas(index_dir, gallery_csv):
    """Issue 15 item 7: the default backbone and the decoder are plain torch + Pillow; importing timm
    (which imports torchvision and torch._dynamo) cost 2.3 s of every cold `geo query`. Issue 25: nor httpx,
    which only `geo query --server` needs (0.1 s); nor pandas (item 2: the query side reads its tables as
    numpy columns, geo.core.tables; pandas cost 0.25 s to import, and pyarrow imports it behind `to_numpy` and
    `pq.read_table` through pyarrow.dataset); nor pyarrow.compute, which only --embeddings input needs. One cold
    query checks them all: each costs the suite a process that imports torch."""
    photo = pd.read_csv(gallery_csv)["path"].iloc[0]
    assert _cold_query_modules(photo, index_dir, ("timm", "torchvision", "sklearn", "scipy", "httpx", "pandas",
                                                  "pyarrow.dataset", "pyarrow.compute")) == []


def test_query_json_lines_for_many_images_and_a_missing_one(index_dir, gallery_csv):
    paths = pd.read_csv(gallery_csv)["path"].tolist()[:3]
    r = invoke("query", *paths, "/nonexistent/photo.jpg", "--index", index_dir, "--json")
    assert r.exit_code == 3, r.output  # one input failed, three answered
    assert "error: 1 of 4 inputs could not be answered: /nonexistent/photo.jpg (file not found)" in r.stderr
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert [x["image"] for x in lines] == [*paths, "/nonexistent/photo.jpg"]
    for x in lines[:3]:
        assert {"lat", "lon", "confidence", "neighbors"} <= x.keys() and x["error"] is None
        assert len(x["neighbors"]) >= 5
        assert {"id", "lat", "lon", "similarity", "distance_km"} <= x["neighbors"][0].keys()
        assert 0.0 <= x["confidence"] <= 1.0
    assert lines[3]["error"] and lines[3]["lat"] is None


def test_query_a_directory_of_held_out_photos(index_dir):
    r = invoke("query", EXAMPLES / "queries", "--index", index_dir)
    assert r.exit_code == 0, r.output
    assert r.output.count("neighbour") == 5 * 3  # five photos, three neighbours shown each
    assert r.output.count("[fused]") == 5


def test_tampered_bundle_is_refused(index_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(index_dir, copy)
    shard = copy / "embeddings" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = invoke("info", copy, "--verify")  # sha256 of every file: the altered byte is found
    assert r.exit_code == 2
    assert "part-00001.parquet" in r.output and "sha256" in r.output
    shard.write_bytes(bytes(data[:-100]))  # a truncated file is refused at open, by its size
    r = invoke("query", EXAMPLES / "queries", "--index", copy)
    assert r.exit_code == 2
    assert "part-00001.parquet" in r.output and "truncated" in r.output


def test_info_says_what_the_bundle_holds_and_what_was_verified(index_dir):
    r = invoke("info", index_dir)
    assert r.exit_code == 0, r.output
    for stage in ("embeddings", "knn_index", "cells", "gallery", "fusion"):
        assert f"  {stage}: " in r.output
    assert "66 indexed" in r.output and "sizes checked" in r.output
    r = invoke("info", index_dir, "--verify", "--json")
    info = json.loads(r.output)
    assert info["verified"] == {"files": len(info_files(index_dir)), "sha256": True}
    assert info["counts"]["ok"] == 66 and info["backbone"]["name"] == "efficientnet_lite0"
    assert invoke("info", index_dir.parent / "no-such-bundle").exit_code == 2


def info_files(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())["files"]


def test_backbones_lists_every_registered_model():
    r = invoke("backbones")
    assert r.exit_code == 0
    names = [line.split(":")[0] for line in r.output.strip().splitlines()]
    assert {"efficientnet_lite0", "timm", "torchvision", "open_clip", "geoclip"} <= set(names)


def test_interrupted_build_resumes_with_the_same_rows(index_dir, gallery_csv, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(index_dir, out)
    # simulate a crash: the last shard's marker never got written and a temp file was left behind
    (out / "embeddings" / "part-00002.json").unlink()
    (out / "embeddings" / ".part-00002.parquet.junk.tmp").write_bytes(b"half")
    (out / "stages-were-here").write_text("")
    r = invoke("build-index", gallery_csv, "--out", out, "--workers", 0, "--config", FAST_BUILD, "-q")
    assert r.exit_code == 0, r.output
    before = pd.concat([pq.read_table(p).to_pandas() for p in sorted((index_dir / "embeddings").glob("part-*.parquet"))])
    after = pd.concat([pq.read_table(p).to_pandas() for p in sorted((out / "embeddings").glob("part-*.parquet"))])
    assert after["id"].tolist() == before["id"].tolist()
    assert after["id"].is_unique and len(after) == 66
    np.testing.assert_allclose(np.stack(after["embedding"]), np.stack(before["embedding"]), atol=1e-5)
    geo.open_index(out)
    assert invoke("info", out, "--verify").exit_code == 0  # manifest hashes match the re-written shard


def test_resume_with_another_manifest_is_refused(index_dir, gallery_csv, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(index_dir, out)
    df = pd.read_csv(gallery_csv).head(6)
    other = tmp_path / "other.csv"
    df.to_csv(other, index=False)
    r = invoke("build-index", other, "--out", out, "--workers", 0, "-q", "--config", FAST_BUILD)
    assert r.exit_code == 2 and "different manifest" in r.output


def _bad_inputs(tmp: Path, good: list[str]) -> pd.DataFrame:
    """Fourteen ways a gallery goes wrong, beside good photos (two of them in odd formats)."""
    def f(name: str, data: bytes) -> str:
        (tmp / name).write_bytes(data)
        return str(tmp / name)

    jpeg = Path(good[0]).read_bytes()
    cmyk, pal = tmp / "cmyk.jpg", tmp / "palette.png"
    Image.open(good[1]).convert("CMYK").save(cmyk)
    Image.open(good[2]).convert("P").save(pal)
    big = io.BytesIO()
    Image.new("RGB", (4000, 4000)).save(big, "PNG")
    rows = [
        ("ok1", good[3], 10.0, 10.0),
        ("ok-cmyk", str(cmyk), 11.0, 11.0),
        ("ok-palette", str(pal), 12.0, 12.0),
        ("missing", str(tmp / "nope.jpg"), 1.0, 1.0),
        ("zero", f("zero.jpg", b""), 1.0, 1.0),
        ("text", f("text.jpg", b"hello, not a photo"), 1.0, 1.0),
        ("truncated", f("trunc.jpg", jpeg[: len(jpeg) // 3]), 1.0, 1.0),
        ("directory", str(tmp), 1.0, 1.0),
        ("bomb", f("bomb.png", big.getvalue()), 1.0, 1.0),
        ("svg", f("vector.jpg", b"<svg xmlns='http://www.w3.org/2000/svg'/>"), 1.0, 1.0),
        ("nan-lat", good[4], float("nan"), 1.0),
        ("lat-range", good[4], 91.0, 1.0),
        ("lon-range", good[4], 1.0, -181.0),
        ("ok1", good[5], 2.0, 2.0),  # duplicate id
        ("badnum", good[4], "north", 1.0),
        ("", "", 1.0, 1.0),  # no image at all
    ]
    return pd.DataFrame(rows, columns=["id", "path", "lat", "lon"])


def test_bad_inputs_each_get_an_error_row_and_the_build_completes(gallery_csv, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000_000)  # 4000x4000 is then a decompression bomb
    good = pd.read_csv(gallery_csv)["path"].tolist()
    df = _bad_inputs(tmp_path, good)
    manifest = tmp_path / "bad.csv"
    df.to_csv(manifest, index=False)
    out = tmp_path / "bundle"
    r = invoke("build-index", manifest, "--out", out, "--workers", 0, "-q")
    assert r.exit_code == 0, r.output
    assert "3 photos indexed, 13 failed" in r.output
    errors = pq.read_table(out / "errors.parquet").to_pandas()
    assert len(errors) == 13 and errors["reason"].str.len().min() > 3
    assert set(errors["stage"]) == {"manifest", "image"}
    ids = set(pd.concat([pq.read_table(p).to_pandas() for p in (out / "embeddings").glob("*.parquet")])["id"])
    assert ids == {"ok1", "ok-cmyk", "ok-palette"}
