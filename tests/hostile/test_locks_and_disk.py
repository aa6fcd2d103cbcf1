"""Clean failure: one writer per bundle (stale locks taken over), temp files never left behind, a reader
never alarmed by a commit in progress, a full disk named with the numbers, and one exception boundary."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import threading
import time
from collections import namedtuple
from pathlib import Path

import pytest
from conftest import cli, manifest_of, one_line_error, photo

import geo
import geo.store.atomic as atomic
from geo.store.bundle import BundleError
from geo.store.lock import LOCK_FILE, _start_time


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A three-photo manifest (a kNN-only bundle: quick to build)."""
    m = tmp_path / "m.csv"
    m.write_text("path,lat,lon\n" + "".join(f"{photo(i)},{10 + i},{20 + i}\n" for i in range(3)))
    return m


@pytest.fixture
def sleeper():
    p = subprocess.Popen(["sleep", "600"])
    yield p
    p.kill()
    p.wait()


def _hold(root: Path, pid: int, start: str | None, host: str | None = None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / LOCK_FILE).write_text(json.dumps({"pid": pid, "pid_start": start, "host": host or os.uname().nodename,
                                              "started": "2026-11-28T00:00:00+00:00", "command": "geo build-index x"}))


def _build(manifest: Path, out: Path, *more: str):
    return cli("build-index", manifest, "--out", out, "--workers", "0", *more)


# ---------------------------------------------------------------- the lock
@pytest.mark.parametrize("command", ["build", "add"])
def test_a_second_writer_is_refused_at_once_naming_the_first(tiny, tmp_path, sleeper, command):
    out = tmp_path / "b"
    assert _build(tiny, out).exit_code == 0
    before = manifest_of(out)
    _hold(out, sleeper.pid, _start_time(sleeper.pid))
    r = _build(tiny, out, "--force", "knn_index") if command == "build" else cli("add", out, tiny)
    one_line_error(r, "another geo process is writing this bundle", f"pid {sleeper.pid}", code=1)
    assert manifest_of(out) == before and (out / LOCK_FILE).exists()  # the holder's lock stays


def test_a_lock_on_another_host_is_respected(tiny, tmp_path):
    _hold(tmp_path / "b", 1, None, host="elsewhere.example")
    one_line_error(_build(tiny, tmp_path / "b"), "on elsewhere.example", "delete", code=1)


@pytest.mark.parametrize("holder", ["dead pid", "reused pid", "empty file"])
def test_a_stale_lock_is_taken_over(tiny, tmp_path, holder):
    out = tmp_path / "b"
    if holder == "dead pid":
        p = subprocess.Popen(["true"])
        p.wait()
        _hold(out, p.pid, None)
    elif holder == "reused pid":  # a live pid whose start time is not the holder's
        _hold(out, os.getpid(), "1")
    else:
        out.mkdir()
        (out / LOCK_FILE).write_text("")
        os.utime(out / LOCK_FILE, (time.time() - 60, time.time() - 60))
    r = _build(tiny, out)
    assert r.exit_code == 0, r.output
    assert not (out / LOCK_FILE).exists()


def test_a_lock_being_created_right_now_is_respected(tiny, tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / LOCK_FILE).write_text("")
    one_line_error(_build(tiny, tmp_path / "b"), "starting to write this bundle", code=1)


def test_the_lock_and_an_empty_folder_go_when_a_build_fails(tiny, tmp_path):
    r = _build(tiny, tmp_path / "b", "--backbone", "no-such-model")
    assert r.exit_code == 2 and not (tmp_path / "b").exists(), r.output


def test_temp_files_of_a_killed_run_are_removed_by_the_next(tiny, tmp_path):
    """Why #9: kill -9 left .tmp files behind."""
    out = tmp_path / "b"
    assert _build(tiny, out).exit_code == 0
    left = [out / ".manifest.json.a1b2c3d4.tmp", out / "index" / ".knn.faiss.zz_9yx8w.tmp"]
    for p in left:
        p.write_bytes(b"half")
    keep = out / "notes.tmp"  # not ours: left alone
    keep.write_text("mine")
    r = cli("build-index", tiny, "--out", out, "--workers", "0")
    assert r.exit_code == 0 and "removed 2 temporary file(s)" in r.output, r.output
    assert not any(p.exists() for p in left) and keep.exists()


# ---------------------------------------------------------------- readers
def test_a_reader_waits_out_a_commit_in_progress(bundle, sleeper):
    """Why #9: a reader during a rebuild got a false "altered" error."""
    _hold(bundle, sleeper.pid, _start_time(sleeper.pid))
    faiss = bundle / "index" / "knn.faiss"
    original = faiss.read_bytes()
    faiss.write_bytes(original + b"new")  # the writer replaced a file and has not committed yet
    threading.Timer(1.0, lambda: faiss.write_bytes(original)).start()  # ... and now it has
    t = time.monotonic()
    index = geo.open_index(bundle)
    assert time.monotonic() - t >= 0.8 and index.knn.ntotal == 66


def test_without_a_writer_a_mismatch_is_reported_at_once(bundle):
    faiss = bundle / "index" / "knn.faiss"
    faiss.write_bytes(faiss.read_bytes() + b"x")
    t = time.monotonic()
    with pytest.raises(BundleError, match="truncated or altered"):
        geo.open_index(bundle)
    assert time.monotonic() - t < 5


# ---------------------------------------------------------------- disk space
def test_a_stage_that_would_not_fit_is_refused_before_it_starts(tiny, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: usage(10 << 20, 9 << 20, 1 << 20))
    r = _build(tiny, tmp_path / "b")
    one_line_error(r, "the embeddings stage needs about", "1.0 MiB free", "resumes", code=1)


def test_disk_full_mid_build_says_the_build_resumes_and_it_does(tiny, tmp_path, monkeypatch):
    """Why #9: ENOSPC gave a raw traceback after all the work, with no hint that a re-run resumes."""
    out = tmp_path / "b"
    real = atomic.atomic_write

    def full(path, writer):
        if Path(path).name == "knn.faiss":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, writer)

    monkeypatch.setattr(atomic, "atomic_write", full)
    one_line_error(_build(tiny, out), "disk full writing", "knn.faiss", "re-run the same command", code=1)
    shard = out / "embeddings" / "part-00000.parquet"
    mtime = shard.stat().st_mtime_ns
    monkeypatch.setattr(atomic, "atomic_write", real)
    r = _build(tiny, out)
    assert r.exit_code == 0, r.output
    assert shard.stat().st_mtime_ns == mtime and not (out / LOCK_FILE).exists()  # resumed, not redone


# ---------------------------------------------------------------- the exception boundary
def test_an_unexpected_failure_is_one_line_and_debug_shows_it(bundle, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("wires crossed\nsecond line")

    monkeypatch.setattr(geo.query.index.GeoIndex, "locate_modes", boom)
    r = cli("query", photo(3), "--index", bundle)
    one_line_error(r, "RuntimeError: wires crossed", "--debug", code=1)
    assert "second line" not in r.output
    assert isinstance(cli("--debug", "query", photo(3), "--index", bundle).exception, RuntimeError)
    monkeypatch.setenv("GEO_DEBUG", "1")
    assert isinstance(cli("query", photo(3), "--index", bundle).exception, RuntimeError)


def test_an_interrupt_says_how_to_resume(bundle, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(geo.query.index.GeoIndex, "locate_modes", interrupted)
    one_line_error(cli("query", photo(3), "--index", bundle), "interrupted", "resume", code=130)


def test_the_build_copies_no_bundle_to_tmp(tiny, tmp_path, monkeypatch):
    """Why #9: a killed build left /tmp/geo-fusion-* copies; nothing is staged outside the bundle now."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr("tempfile.tempdir", None)
    assert _build(tiny, tmp_path / "b").exit_code == 0
    assert not list(scratch.iterdir())
    shutil.rmtree(tmp_path / "b")


# ---------------------------------------------------------------- every writer, every file (issue 27 #7)
def test_the_gallery_plan_counts_the_gps_gallery_s_points_on_disk():
    """Why #7: the free-space check missed the GPS gallery's points (GeoCLIP's 100K) beside the photos' places."""
    from geo.pipeline import BuildConfig, plan_stages

    def gallery_disk(**kw) -> int:
        plans = plan_stages(BuildConfig(manifest="m.csv", out="o", **kw), 1000, 512)
        return next(p.disk for p in plans if p.stage == "gallery")

    own = gallery_disk()
    assert gallery_disk(backbone="geoclip") - own >= 100_000 * 513 * 4
    assert own >= 1000 * 513 * 4


def test_disk_full_in_a_safetensors_write_says_the_build_resumes_and_it_does(tmp_path, monkeypatch):
    """Why #7: safetensors' own ENOSPC error ended in "an unexpected failure"."""
    import safetensors.torch
    from synthetic import config_file, synthetic_gallery, write_embeddings

    emb = write_embeddings(synthetic_gallery(120), tmp_path / "e.parquet")
    out = tmp_path / "b"
    fast = config_file(tmp_path / "fast.json", {"gallery": {"epochs": 1}})
    build = ("build-index", "--embeddings", emb, "--backbone", "toy24", "--config", fast, "--out", out, "--skip",
             "fusion", "-q")  # the write that fails is the gallery's; fusion after it would add time, not a check
    real = safetensors.torch.save_file

    def full(tensors, filename, metadata=None):
        if "image_projection" in str(filename) or "image_projection" in str(metadata):
            raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                              'message: "No space left on device" })')
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    r = cli(*build)
    one_line_error(r, "disk full writing", str(out / "gallery"), "re-run the same command", code=1)
    assert ".tmp" not in r.output and not list(out.rglob("*.tmp"))
    assert "gallery" not in manifest_of(out)["stages"] and "cells" in manifest_of(out)["stages"]
    shard = out / "embeddings" / "part-00000.parquet"
    mtime = shard.stat().st_mtime_ns
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    r = cli(*build)
    assert r.exit_code == 0, r.output
    assert shard.stat().st_mtime_ns == mtime and "gallery" in manifest_of(out)["stages"]
