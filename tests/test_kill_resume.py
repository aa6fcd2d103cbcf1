"""A build killed (SIGKILL) mid-way, twice, then re-run, ends as the uninterrupted build of the same command."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from geo.query.index import open_index
from geo.store.bundle import open_bundle
from geo.store.embeddings import EmbeddingReader

FLAGS = ["--workers", "0", "--config", str(Path(__file__).parent / "fast_build.json"), "-q"]  # as cli_bundle


def start(manifest: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from geo.cli import app; app()", "build-index", str(manifest), "--out", str(out), *FLAGS]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, f"the build ended before {what}: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() - t0 < timeout, f"no {what} after {timeout} s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # it really died mid-way, not after finishing


def stages(out: Path) -> dict:
    try:
        return json.loads((out / "manifest.json").read_text()).get("stages", {})
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_killed_twice_then_resumed_equals_the_uninterrupted_build(cli_bundle, tmp_path):
    manifest, reference = cli_bundle
    out = tmp_path / "bundle"
    # 1: killed while embedding, once the first shards are done
    kill_when(start(manifest, out), lambda: len(list((out / "embeddings").glob("part-*.json"))) >= 2,
              "two finished shards")
    assert "embeddings" not in stages(out)
    # 2: killed in the trained stages, after the kNN index was committed
    kill_when(start(manifest, out), lambda: "knn_index" in stages(out), "a committed kNN index")
    assert "fusion" not in stages(out)
    # 3: runs to the end
    proc = start(manifest, out)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-2000:]
    assert not list(out.rglob("*.tmp*"))  # no temp file of a killed write is left behind

    got, want = open_bundle(out, hashes=True), open_bundle(reference)
    assert got.manifest["counts"] == want.manifest["counts"]
    (m1, e1), (m2, e2) = EmbeddingReader(got).read(), EmbeddingReader(want).read()
    assert m1["id"].tolist() == m2["id"].tolist()
    np.testing.assert_allclose(e1, e2, atol=1e-6)
    assert got.stage("fusion")["params"] == want.stage("fusion")["params"]
    a, b = open_index(out), open_index(reference)
    for mode in ("knn", "cells", "gallery", "fused"):
        x, y = a.locate_embeddings(e2[::4], mode=mode), b.locate_embeddings(e2[::4], mode=mode)
        np.testing.assert_allclose([[r.lat, r.lon] for r in x], [[r.lat, r.lon] for r in y], atol=1e-6, err_msg=mode)
