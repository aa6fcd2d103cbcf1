"""A bundle that cannot lie: the manifest is the only truth, damage is refused with the file and the reason,
an unfinished build is refused, and nothing a stray file holds reaches an answer."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import cli, manifest_of, one_line_error, photo, rehash, write_manifest

import geo


def _answer(bundle, image=None) -> dict:
    r = cli("query", image or photo(3), "--index", bundle, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.splitlines()[0])


# ---------------------------------------------------------------- stray files
@pytest.mark.parametrize("stray", ["part-00000 copy", "part-99999", "part-00000.bak"])
def test_a_stray_shard_is_never_read_and_geo_info_names_it(bundle, stray):
    """Why #1: a copied shard with its marker, which a glob picked up, shifted metadata against FAISS rows."""
    before = _answer(bundle)
    first = bundle / "embeddings" / "part-00000.parquet"
    shutil.copy(first, bundle / "embeddings" / f"{stray}.parquet")
    shutil.copy(first.with_suffix(".json"), bundle / "embeddings" / f"{stray}.json")
    after = _answer(bundle)
    assert (after["lat"], after["lon"], after["neighbors"][0]["id"]) == (before["lat"], before["lon"],
                                                                         before["neighbors"][0]["id"])
    info = json.loads(cli("info", bundle, "--json").stdout)
    assert f"embeddings/{stray}.parquet" in info["unlisted"] and f"embeddings/{stray}.json" in info["unlisted"]
    assert "not part of the bundle" in cli("info", bundle).output


# ---------------------------------------------------------------- unfinished builds
@pytest.mark.parametrize("missing", ["fusion", "cells", "knn_index"])
def test_a_build_killed_before_a_stage_is_refused_not_answered_partly(bundle, missing):
    """Why #6: killed before the cells stage, a bundle answered kNN-only without a word; killed
    mid-embedding, queries crashed with a FAISS traceback while geo info called it fine."""
    m = manifest_of(bundle)
    assert missing in m["build"]["stages"]
    del m["stages"][missing]
    write_manifest(bundle, m)
    one_line_error(cli("query", photo(3), "--index", bundle), "unfinished build", missing, "Re-run")
    one_line_error(cli("info", bundle), "unfinished build")
    assert json.loads(cli("info", bundle, "--json").stdout)["unfinished"] == [missing]


def test_a_bundle_from_a_killed_first_shard_is_refused(bundle):
    m = manifest_of(bundle)
    m["stages"] = {"embeddings": m["stages"]["embeddings"]}
    write_manifest(bundle, m)
    with pytest.raises(geo.store.bundle.BundleError, match="unfinished build: embeddings done"):
        geo.open_index(bundle)


# ---------------------------------------------------------------- the manifest itself
@pytest.mark.parametrize("edit,words", [
    (lambda m: m.update(format_version=-7), "format_version -7"),
    (lambda m: m.update(format_version="1"), "format_version '1'"),
    (lambda m: m.update(format_version=True), "format_version True"),
    (lambda m: m.update(format_version=99), "newer than this geo"),
    (lambda m: m.update(format="something-else"), "not a geo index bundle"),
    (lambda m: m["counts"].update(ok=999999), "counts.ok is 999999"),
    (lambda m: m.update(stages=[]), "'stages' is not a JSON object"),
    (lambda m: m.update(files="all of them"), "'files' is not a JSON object"),
    (lambda m: m["stages"].update(cells=7), "stage 'cells' is not a JSON object"),
])
def test_an_edited_manifest_is_refused(bundle, edit, words):
    m = manifest_of(bundle)
    edit(m)
    write_manifest(bundle, m)
    one_line_error(cli("info", bundle), "manifest.json", words)
    one_line_error(cli("query", photo(3), "--index", bundle), words)


@pytest.mark.parametrize("damage,words", [
    (lambda p: p.write_text("{ not json"), "not valid JSON"),
    (lambda p: p.write_bytes(b"\xff\xfe\x00"), "not valid JSON"),
    (lambda p: p.unlink(), "missing"),
    (lambda p: (p.unlink(), os.mkfifo(p)), "FIFO"),
    (lambda p: (p.unlink(), p.symlink_to("/dev/zero")), "character device"),
])
def test_an_unreadable_manifest_is_refused_without_hanging(bundle, damage, words):
    damage(bundle / "manifest.json")
    one_line_error(cli("info", bundle, timeout=30), "manifest.json", words)


# ---------------------------------------------------------------- listed files
def _files(bundle, suffix: str) -> list[str]:
    return sorted(f for f in manifest_of(bundle)["files"] if f.endswith(suffix))


@pytest.mark.parametrize("how", ["truncated", "header"])
@pytest.mark.parametrize("suffix", [".faiss", "part-00000.parquet", ".safetensors", "fusion.json",
                                    "cells/fine.parquet"])
def test_a_damaged_file_with_updated_checksums_is_a_clear_error(bundle, suffix, how):
    """Why #6: corrupted FAISS/Parquet/safetensors files whose checksums were updated raised tracebacks."""
    rel = _files(bundle, suffix)[0]
    data = (bundle / rel).read_bytes()
    (bundle / rel).write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x07" * 24 + data[24:])
    rehash(bundle, rel)
    r = cli("query", photo(3), "--index", bundle)
    one_line_error(r, str(bundle))
    assert any(w in r.output for w in ("cannot be read", "cannot read", "not a readable", "not valid JSON")), r.output


@pytest.mark.parametrize("rel,stage", [("gallery/gallery.faiss", "gallery"),
                                       ("gallery/image_projection.safetensors", "gallery"),
                                       ("gallery/points.parquet", "gallery"),
                                       ("cells/fine.parquet", "cells"),
                                       ("embeddings/part-00000.parquet", "knn_index")])
def test_a_damaged_stage_file_names_the_stage_to_rebuild(bundle, rel, stage):
    """What FAISS, safetensors and pyarrow raise on a damaged file is the bundle's fault: rebuild that stage."""
    data = (bundle / rel).read_bytes()
    (bundle / rel).write_bytes(data[: len(data) // 2])
    rehash(bundle, rel)
    with pytest.raises(geo.store.bundle.BundleError) as e:
        geo.open_index(bundle)
    assert f"{bundle}: the {stage} stage's files cannot be read" in str(e.value) and f"--force {stage}" in str(e.value)


@pytest.mark.parametrize("error", [TypeError("load() got an unexpected keyword"), AttributeError("no attribute 'd'"),
                                   NameError("name 'faiss' is not defined"), RuntimeError("CUDA error: out of memory")])
def test_a_defect_in_a_stage_loader_is_not_called_a_damaged_bundle(bundle, monkeypatch, error):
    """Only what damaged files raise becomes "rebuild that stage"; geo's own bug keeps its type and message."""
    from geo.stages.gallery.stage import GpsGallery

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(GpsGallery, "load", broken)
    with pytest.raises(type(error)) as e:
        geo.open_index(bundle)
    assert e.value is error and not isinstance(e.value, geo.store.bundle.BundleError)


@pytest.mark.parametrize("damage,words", [
    (lambda p: p.write_bytes(p.read_bytes()[:-10]), "truncated or altered"),
    (lambda p: p.unlink(), "listed in manifest.json but missing"),
    (lambda p: (p.unlink(), os.mkfifo(p)), "FIFO"),
    (lambda p: (p.unlink(), p.symlink_to("/dev/zero")), "leads outside the bundle (a symlink to /dev/zero)"),
])
def test_a_listed_file_that_changed_is_refused_by_size_before_it_is_read(bundle, damage, words):
    """Why #2: a manifest `files` entry pointing at /dev/zero hung geo info."""
    rel = _files(bundle, ".faiss")[0]
    damage(bundle / rel)
    one_line_error(cli("info", bundle, "--verify", timeout=30), rel, words)


def test_an_altered_file_of_the_same_size_is_caught_by_verify(bundle):
    rel = _files(bundle, "fusion.json")[0]
    text = (bundle / rel).read_text()
    (bundle / rel).write_text(text.replace("0", "1", 1))
    assert cli("info", bundle).exit_code == 0  # sizes only
    one_line_error(cli("info", bundle, "--verify"), rel, "sha256 does not match")


# ---------------------------------------------------------------- entries that point elsewhere (issue 27 #8)
def _real(path: str) -> dict:
    from geo.store.atomic import sha256_file

    return {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}


@pytest.mark.parametrize("entry,meta,words", [
    ("/etc/passwd", lambda: _real("/etc/passwd"), "is not a relative path inside the bundle"),
    ("../../dev/zero", lambda: {"sha256": "0" * 64, "bytes": 0}, "is not a relative path inside the bundle"),
    ("index/../../outside", lambda: {"sha256": "0" * 64, "bytes": 0}, "is not a relative path inside the bundle"),
    ("", lambda: {"sha256": "0" * 64, "bytes": 0}, "is not a relative path inside the bundle"),
    ("index/knn.faiss", lambda: {"sha256": "0" * 64}, "has no valid bytes"),
    ("index/knn.faiss", lambda: {"sha256": "0" * 64, "bytes": "12"}, "has no valid bytes"),
    ("index/knn.faiss", lambda: {"sha256": "0" * 64, "bytes": -1}, "has no valid bytes"),
    ("index/knn.faiss", lambda: {"bytes": 12}, "has no valid sha256"),
    ("index/knn.faiss", lambda: {"bytes": 12, "sha256": "../x"}, "has no valid sha256"),
    ("index/knn.faiss", lambda: "abc", "is not a JSON object"),
])
def test_a_files_entry_must_be_a_file_of_the_bundle_with_its_size_and_hash(bundle, entry, meta, words):
    """Why #8: `/etc/passwd` with its real sha256 passed `geo info --verify`; `../../dev/zero` was followed; an
    entry without `bytes` was a KeyError."""
    m = manifest_of(bundle)
    m["files"][entry] = meta()
    write_manifest(bundle, m)
    for r in (cli("info", bundle, "--verify", timeout=30), cli("query", photo(3), "--index", bundle, timeout=30)):
        one_line_error(r, "files entry", repr(entry), words)


def test_a_listed_file_that_is_a_symlink_out_of_the_bundle_is_refused(bundle, tmp_path):
    """Same size, same sha256, but the content lives elsewhere: the bundle no longer holds what it vouches for."""
    rel = _files(bundle, "fusion.json")[0]
    outside = tmp_path / "elsewhere.json"
    outside.write_bytes((bundle / rel).read_bytes())
    (bundle / rel).unlink()
    (bundle / rel).symlink_to(outside)
    one_line_error(cli("info", bundle, "--verify", timeout=30), rel, "leads outside the bundle")
    one_line_error(cli("query", photo(3), "--index", bundle, timeout=30), rel, "leads outside the bundle")


# ---------------------------------------------------------------- stage files of the wrong shape (issue 27 #9)
@pytest.mark.parametrize("rel,edit,field", [
    ("fusion/fusion.json", lambda d: {"weights": "x"}, "'params' is missing"),
    ("fusion/fusion.json", lambda d: {**d, "params": {**d["params"], "signals": {"knn": {"weight": "x"}}}},
     "'params.signals.knn.weight' is str 'x', not a finite number"),
    ("fusion/fusion.json", lambda d: {**d, "params": {**d["params"], "duplicate_similarity": float("nan")}},
     "'params.duplicate_similarity'"),
    ("fusion/fusion.json", lambda d: [1, 2], "'(top level)' is list"),
    ("heads/heads.json", lambda d: {**d, "model": {**d["model"], "n_classes": "many"}}, "'model.n_classes' is str"),
    ("heads/heads.json", lambda d: {**d, "calibration": {"alpha": 1.0}}, "'calibration.temperature' is missing"),
    ("gallery/gallery.json", lambda d: {**d, "n_points": "lots"}, "'n_points' is str"),
    ("gallery/gallery.json", lambda d: {**d, "sources": {"photo": None}}, "'sources.photo' is NoneType"),
])
def test_a_stage_file_of_the_wrong_shape_is_refused_naming_the_file_and_field(bundle, rel, edit, field):
    """Why #9: a garbage fusion.json (sha updated) was accepted and answered as before."""
    data = json.loads((bundle / rel).read_text())
    (bundle / rel).write_text(json.dumps(edit(data)))
    rehash(bundle, rel)
    one_line_error(cli("query", photo(3), "--index", bundle), rel, "field " + field)
