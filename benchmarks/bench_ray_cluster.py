"""A two-node Ray cluster on this machine builds the kNN index of precomputed embeddings: the bundle of one process.

    nice -n 5 python benchmarks/bench_ray_cluster.py                    # 147K x 1280 from /tmp/r150k, IVF
    nice -n 5 python benchmarks/bench_ray_cluster.py --photos 3000      # the same check, small (IVF still)

What it does, every step from this script so that it reproduces:

1. Starts a Ray cluster of two nodes here: a head (``ray start --head --port PORT``) and a second raylet that
   joins it (``ray start --address 127.0.0.1:PORT``), one CPU and a small object store each, each with its own
   temp dir, and checks that ``ray status`` lists two active nodes.
2. Builds the embeddings and the kNN index (``--skip cells --skip gallery --skip fusion``) with the real command,
   ``geo build-index --embeddings ...``, once in one process and once with ``--ray 127.0.0.1:PORT``; wall time
   and the driver's peak RSS of each (GNU time, as ``bench_scale.py``).
3. Compares the bundles: the rows' ids in FAISS order, the ``index/knn.faiss`` bytes, the tuned nprobe, and the
   answers (ids and similarities) of both indexes to ``--queries-n`` query vectors.
4. Counts where the build's Ray tasks ran: every Ray worker writes a ``:task_name:NAME`` line per task into its
   ``worker-*.out`` log, and each node keeps its logs under its own temp dir, so the ``fill_shard`` and
   ``list_sizes`` lines (:func:`geo.cluster.ray_map`'s tasks, one of each per embedding shard) per node are
   that node's share of the FAISS population.
5. Stops the cluster, also on failure: by the process groups the two ``ray start`` made (``ray stop`` would end
   every Ray process on the machine, other users' too).

Exit code 0 only when the bundles are equal and both nodes ran tasks. A JSON summary goes to WORK/summary.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench_scale import run
from geo.stages.knn import INDEX_FILE, KnnIndex
from geo.store.bundle import open_bundle

GEO = [sys.executable, "-c", "from geo.cli import app; app()"]
KNN_ONLY = ["--skip", "cells", "--skip", "gallery", "--skip", "fusion"]
TASKS = ("list_sizes", "fill_shard")  # geo.stages.knn's per-shard work, as geo.cluster.ray_map names its tasks


def subset(src: Path, n: int | None, work: Path) -> Path:
    """The first ``n`` rows of ``src`` as a Parquet file of their own (``src`` itself when n is None)."""
    if n is None:
        return src
    out = work / f"gallery-{n}.parquet"
    batches, rows = [], 0
    for b in pq.ParquetFile(src).iter_batches(batch_size=min(n, 8192)):
        batches.append(b.slice(0, n - rows))
        rows += batches[-1].num_rows
        if rows >= n:
            break
    pq.write_table(pa.Table.from_batches(batches), out)
    return out


def build_config(n: int, work: Path) -> list[str]:
    """A --config that keeps a small run like the big one: three shards (so both nodes get work) and an IVF
    index (the default is exact below 100K photos). Nothing at the default 150K size."""
    if n > 100_000:
        return []
    path = work / "config.json"
    path.write_text(json.dumps({"embed": {"shard_rows": -(-n // 3)}, "knn": {"exact_max": n // 2}}))
    return ["--config", str(path)]


class Cluster:
    """A head and a second node on this machine, stopped by their process groups."""

    def __init__(self, work: Path, port: int, store_bytes: int):
        self.work, self.port, self.store = work, port, store_bytes
        self.address = f"127.0.0.1:{port}"
        self.groups: list[int] = []

    def start(self) -> None:
        common = ["--num-cpus", "1", "--object-store-memory", str(self.store), "--disable-usage-stats"]
        self._ray_start("head", ["--head", "--port", str(self.port), "--include-dashboard", "false",
                                 "--dashboard-agent-listen-port", str(self.port + 1), *common])
        self._ray_start("node", ["--address", self.address, "--dashboard-agent-listen-port", str(self.port + 2),
                                 *common])

    def _ray_start(self, name: str, args: list[str]) -> None:
        temp = self.work / f"ray-{name}"
        shutil.rmtree(temp, ignore_errors=True)
        proc = subprocess.Popen(["ray", "start", "--temp-dir", str(temp), *args], start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.groups.append(proc.pid)  # its daemons stay in the session (and process group) it leads
        out, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"ray start ({name}) failed:\n{out[-3000:]}")

    def nodes(self, expect: int, timeout: float = 60) -> int:
        """Active nodes by ``ray status``, polled until ``expect`` joined or ``timeout``."""
        deadline, active = time.time() + timeout, 0
        while time.time() < deadline:
            out = subprocess.run(["ray", "status", "--address", self.address], capture_output=True, text=True).stdout
            block = out.split("Active:")[1].split("Pending:")[0] if "Active:" in out else ""
            active = len(re.findall(r"^\s*\d+\s+node_", block, re.M))
            if active >= expect:
                break
            time.sleep(2)
        return active

    def tasks_per_node(self, names: tuple[str, ...]) -> dict[str, dict[str, int]]:
        """How many tasks of each name each node's workers ran (their ``:task_name:`` log lines)."""
        out = {}
        for node in ("head", "node"):
            logs = "".join(f.read_text(errors="replace")
                           for f in (self.work / f"ray-{node}" / "session_latest" / "logs").glob("worker-*.out"))
            out[node] = {name: logs.count(f":task_name:{name}\n") for name in names}
        return out

    def stop(self) -> None:
        """SIGTERM to both process groups, SIGKILL to what is left after 15 s (the GCS server takes its time)."""
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 0)):
            alive = [g for g in self.groups if _group_alive(g)]
            for g in alive:
                os.killpg(g, sig)
            deadline = time.time() + wait
            while alive and time.time() < deadline and any(_group_alive(g) for g in alive):
                time.sleep(0.5)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def build(src: Path, out: Path, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()[0]
    wall, rss, code = run([*GEO, "build-index", "--embeddings", str(src), "--backbone", "synthetic-1280",
                           "--group", "AUTHOR", "--out", str(out), "-q", *KNN_ONLY, *extra])
    if code:
        raise RuntimeError(f"build into {out} failed ({code})")
    return {"seconds": round(wall, 1), "peak_rss_gb": round(rss / 1e9, 2), "load_before": round(load, 2)}


def compare(local: Path, clustered: Path, queries: np.ndarray, k: int) -> dict:
    """Same rows in the same FAISS order, the same index file, the same answers to ``queries``."""
    a, b = KnnIndex.load(open_bundle(local), use_gpu=False), KnnIndex.load(open_bundle(clustered), use_gpu=False)
    da, ia = a.search(queries, k)
    db, ib = b.search(queries, k)
    return {
        "rows": int(a.ntotal),
        "index": a.infos["factory"],
        "same_ids_in_order": bool(np.array_equal(a.ids, b.ids)),
        "same_index_file": _sha256(local / INDEX_FILE) == _sha256(clustered / INDEX_FILE),
        "same_nprobe": a.infos.get("nprobe") == b.infos.get("nprobe"),
        "nprobe": a.infos.get("nprobe"),
        "queries": len(queries),
        "same_neighbours": bool(np.array_equal(ia, ib)),
        "same_similarities": bool(np.array_equal(da, db)),
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def query_vectors(path: Path, n: int) -> np.ndarray:
    """The first ``n`` query embeddings, L2-normalised as a query is."""
    col = next(pq.ParquetFile(path).iter_batches(batch_size=n, columns=["embedding"])).column(0)
    q = np.asarray(col.values, np.float32).reshape(len(col), -1)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gallery", type=Path, default=Path("/tmp/r150k/gallery.parquet"))
    p.add_argument("--queries", type=Path, default=Path("/tmp/r150k/queries.parquet"))
    p.add_argument("--photos", type=int, default=None, help="the gallery's first N rows (default: all)")
    p.add_argument("--queries-n", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--work", type=Path, default=Path("/tmp/wt-ray"))
    p.add_argument("--port", type=int, default=6390)
    p.add_argument("--object-store", type=int, default=1_000_000_000, help="bytes per node")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    # a throwaway cluster on 127.0.0.1: Ray's token authentication off for it and its drivers (the builds) alike
    os.environ["RAY_AUTH_MODE"] = "disabled"
    src = subset(args.gallery, args.photos, args.work)
    n = pq.ParquetFile(src).metadata.num_rows
    extra = build_config(n, args.work)
    cluster = Cluster(args.work, args.port, args.object_store)
    summary: dict = {"photos": n, "cluster": cluster.address}
    try:
        cluster.start()
        summary["nodes"] = cluster.nodes(expect=2)
        if summary["nodes"] != 2:
            raise RuntimeError(f"ray status lists {summary['nodes']} active nodes, not 2")
        summary["local"] = build(src, args.work / "local-bundle", extra)
        summary["ray"] = build(src, args.work / "ray-bundle", [*extra, "--ray", cluster.address])
        summary["ray_tasks_per_node"] = cluster.tasks_per_node(TASKS)
    finally:
        cluster.stop()
    summary["equal"] = compare(args.work / "local-bundle", args.work / "ray-bundle",
                               query_vectors(args.queries, args.queries_n), args.k)
    (args.work / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    eq = summary["equal"]
    ok = eq["same_ids_in_order"] and eq["same_neighbours"] and eq["same_similarities"] and eq["same_nprobe"]
    both = all(sum(tasks.values()) > 0 for tasks in summary["ray_tasks_per_node"].values())
    return 0 if ok and both else 1


if __name__ == "__main__":
    sys.exit(main())
