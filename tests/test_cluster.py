"""`geo build-index --ray`: the same bundle through a local Ray instance (2 CPUs) as in one process."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from synthetic import config_file
from typer.testing import CliRunner

from geo.cli import app
from geo.query.index import open_index
from geo.store.bundle import open_bundle
from geo.store.embeddings import EmbeddingReader, marker_path, shard_path

ray = pytest.importorskip("ray", reason='the Ray path needs `pip install "geo[ray]"` (CI installs it)')

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "osv5m"
PHOTOS, SHARD = 22, 5


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    df = pd.read_csv(EXAMPLES / "gallery.csv", dtype={"id": str}).head(PHOTOS)
    df["path"] = [str(EXAMPLES / p) for p in df["path"]]
    df.loc[3, "path"] = str(EXAMPLES / "missing.jpg")  # a failing row must fail the same way on the cluster
    path = tmp_path_factory.mktemp("ray") / "gallery.csv"
    df.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def build(manifest: Path, out: Path, *extra: str) -> None:
    r = CliRunner().invoke(app, ["build-index", str(manifest), "--out", str(out), "--workers", "0", "--config",
                                 str(config_file(out.parent / "c.json", {"embed": {"batch_size": 4, "shard_rows": SHARD}})), "--skip", "cells", "--skip", "gallery", "--skip", "fusion",
                                 "-q", *extra], catch_exceptions=False)
    assert r.exit_code == 0, r.output


def contents(root: Path) -> tuple[pd.DataFrame, np.ndarray]:
    return EmbeddingReader(open_bundle(root)).read()


def test_ray_build_equals_the_single_process_build_and_resumes(manifest, tmp_path):
    local, clustered = tmp_path / "local", tmp_path / "ray"
    build(manifest, local)
    build(manifest, clustered, "--ray", "local")
    (m1, e1), (m2, e2) = contents(local), contents(clustered)
    assert len(m1) == PHOTOS - 1
    assert m1["id"].tolist() == m2["id"].tolist()  # same rows, same order, same shard numbering
    # Ray's workers run torch single-threaded: float sums may be ordered differently, nothing more
    np.testing.assert_allclose(e1, e2, atol=1e-5)
    b1, b2 = open_bundle(local), open_bundle(clustered)
    assert b1.stage("embeddings")["shards"] == b2.stage("embeddings")["shards"] == -(-PHOTOS // SHARD)
    assert b1.manifest["counts"] == b2.manifest["counts"]
    q = e1[::3]
    a1 = open_index(local).locate_embeddings(q, mode="knn", k=5)
    a2 = open_index(clustered).locate_embeddings(q, mode="knn", k=5)
    assert [(a.lat, a.lon) for a in a1] == [(a.lat, a.lon) for a in a2]
    assert [[n["id"] for n in a.neighbors] for a in a1] == [[n["id"] for n in a.neighbors] for a in a2]

    # A distributed build killed while embedding: some shards have markers, nothing is committed yet. Made
    # from a finished build by dropping two shards' markers and every commit (a real kill of a driver would
    # leave the local Ray instance's processes behind in CI); the re-run redoes exactly those two shards.
    killed = open_bundle(clustered)
    redo = (1, 3)
    kept = {i: marker_path(shard_path(killed, i)).stat().st_mtime_ns for i in range(4) if i not in redo}
    for i in redo:
        marker_path(shard_path(killed, i)).unlink()
    killed.manifest["stages"], killed.manifest["files"], killed.manifest["counts"] = {}, {}, {}
    killed.save()
    build(manifest, clustered, "--ray", "local")
    m3, e3 = contents(clustered)
    assert m3["id"].tolist() == m1["id"].tolist()
    np.testing.assert_allclose(e3, e2, atol=1e-6)
    resumed = open_bundle(clustered)
    assert all(marker_path(shard_path(resumed, i)).stat().st_mtime_ns == t for i, t in kept.items())  # not redone
    assert resumed.manifest["counts"] == b1.manifest["counts"]


def test_ray_map_keeps_the_items_order():
    from geo.cluster import ray_map

    items = [-5, 3, -2, 8, -1, 0, 7]
    assert list(ray_map(abs, items)) == [5, 3, 2, 8, 1, 0, 7]


def test_ray_map_names_its_tasks_for_the_work_they_do():
    """Why (issue 25): on a cluster, Ray's task lists and worker logs showed every FAISS task as `_call`."""
    import functools

    from geo.cluster import ray_map

    def _task_name(shard: str, _: object = None) -> str:  # nested: shipped by value, the workers cannot import tests
        return f"{shard}:{ray.get_runtime_context().get_task_name()}"

    assert list(ray_map(_task_name, ["a"])) == ["a:_task_name"]
    assert list(ray_map(functools.partial(_task_name, _=1), ["b", "c"])) == ["b:_task_name", "c:_task_name"]


@pytest.mark.parametrize("loud", [False, True])
def test_ray_is_quiet_unless_verbose(monkeypatch, loud):
    """Why (issue 27, finding 16): --ray printed a core_worker error line and 49 INFO blocks of Ray Data."""
    import logging

    import ray.data

    from geo import cluster
    from geo.core.progress import showing

    seen: dict = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.delenv("RAY_BACKEND_LOG_LEVEL", raising=False)
    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "enable_progress_bars", not loud)
    monkeypatch.setattr(ctx, "print_on_execution_start", not loud)
    with showing(bars=True, verbose=loud):
        cluster.connect("local")
    assert seen["log_to_driver"] is False and seen["logging_level"] == (logging.INFO if loud else logging.ERROR)
    assert ctx.enable_progress_bars is loud and ctx.print_on_execution_start is loud
    assert ("RAY_BACKEND_LOG_LEVEL" in os.environ) is not loud
    monkeypatch.setenv("RAY_BACKEND_LOG_LEVEL", "debug")  # the user's own setting is kept
    with showing(bars=True, verbose=loud):
        cluster.connect("local")
    assert os.environ["RAY_BACKEND_LOG_LEVEL"] == "debug"
