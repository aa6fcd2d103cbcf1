"""Two builders and a reader on one bundle for 30 s (issue 16): one builder refuses, the reader never errs.

Real processes, as users would run them: builder A re-fits the cells, gallery and fusion stages over and
over (each pass replaces their files and commits the manifest), builder B starts while A holds the bundle,
and a reader opens the bundle and answers stored embeddings in a loop the whole time.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from conftest import manifest_of

from geo.store.lock import LOCK_FILE, _holder

DURATION_S = 30.0

READER = """
import sys, time
import numpy as np
import geo
from geo.store.embeddings import EmbeddingReader
root, until = sys.argv[1], time.time() + float(sys.argv[2])
emb = EmbeddingReader(geo.store.bundle.open_bundle(root)).read()[1][:4]
n = 0
while time.time() < until:
    index = geo.open_index(root)
    answers = index.locate_embeddings(emb, mode="fused", k=10)
    assert all(a.error is None and np.isfinite(a.lat) for a in answers), answers
    n += 1
print(n)
"""


def _builder(manifest, out) -> list[str]:
    # the fixture's own arguments (so the embeddings resume as complete), forcing the trained stages
    return [sys.executable, "-c", "from geo.cli import app; app()", "build-index", str(manifest), "--out", str(out),
            "--workers", "0", "--config", str(Path(__file__).parents[1] / "fast_build.json"), "-q",
            "--force", "cells", "--force", "gallery", "--force", "fusion"]


def _holds_the_lock(proc: subprocess.Popen, bundle: Path) -> bool:
    """Wait until ``proc`` holds the bundle's write lock (True) or has ended (False). Why: a fixed 4-s wait
    (its imports done by then) failed in a full run: A was still importing, B took the lock and A was refused."""
    while proc.poll() is None:
        if (_holder(bundle / LOCK_FILE) or {}).get("pid") == proc.pid:  # None: no lock yet, or one being written
            return True
        time.sleep(0.05)
    return False


def test_two_builders_and_a_reader_for_30_seconds(cli_bundle, bundle):
    manifest, _ = cli_bundle
    created = manifest_of(bundle)["created"]
    reader = subprocess.Popen([sys.executable, "-c", READER, str(bundle), str(DURATION_S)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    deadline, passes, refusals = time.monotonic() + DURATION_S, 0, []
    while time.monotonic() < deadline:
        a = subprocess.Popen(_builder(manifest, bundle), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if _holds_the_lock(a, bundle):
            b = subprocess.run(_builder(manifest, bundle), capture_output=True, text=True, timeout=120)
            refusals.append((b.returncode, b.stderr))
        out, err = a.communicate(timeout=600)
        assert a.returncode == 0, err[-3000:]
        passes += 1
    out, err = reader.communicate(timeout=600)
    assert reader.returncode == 0, err[-3000:]
    assert int(out.strip()) >= 5  # the reader kept answering through every commit
    assert passes >= 1 and refusals, "builder B never overlapped builder A"
    for code, err in refusals:
        assert code == 1 and "another geo process is writing this bundle" in err, err
    m = manifest_of(bundle)
    assert m["created"] == created and not m.get("stale") and {"cells", "gallery", "fusion"} <= set(m["stages"])
