"""`geo serve` under load: latency and throughput over loopback, against the bare `GeoIndex.locate` in the same run.

    python benchmarks/bench_serve.py --bundle /tmp/srv/bundle --images /work/shared/data/osv5m-sample/images

Measures, in one run on one machine:

* bare: `GeoIndex.locate` in this process on the same photos, one photo per call (what a naive
  per-request server does) and 16 per call (the best batching this backbone allows);
* the server (`geo serve` as its own process) with micro-batching (max_batch 16) and without
  (max_batch 1, both set through `--config`), each at concurrency 1, 8 and 32: up to --requests requests (one photo each,
  multipart, as `curl -F images=@x.jpg` sends them) or --seconds, whichever ends first.

Every request must answer 200 with coordinates; the script fails otherwise. The client is one asyncio
process on the same cores, so it competes with the server (its share of the machine's CPU is
reported): the ratios, not the absolute rates, are the result. Prints a markdown table and writes OUT.json.

    python benchmarks/bench_serve.py --bundle /tmp/srv/bundle --memory 8

measures instead the server's resident memory (peak and 5 s after) under 8 parallel maximal requests.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serving import free_port, wait_healthy  # noqa: E402

from geo.data.images import expand_images  # noqa: E402
from geo.query.index import open_index  # noqa: E402


def bare(bundle: Path, photos: list[str], n: int, batch: int) -> float:
    """Photos per second through GeoIndex.locate, ``batch`` photos per call, after one warm-up call."""
    idx = open_index(bundle)
    idx.locate(photos[:batch])
    todo = [photos[i % len(photos)] for i in range(n)]
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        idx.locate(todo[start:start + batch])
    return n / (time.perf_counter() - t0)


async def load(url: str, blobs: list[tuple[str, bytes]], concurrency: int, requests: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    sent = 0
    deadline = time.perf_counter() + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            name, data = blobs[sent % len(blobs)]
            sent += 1
            t = time.perf_counter()
            r = await client.post(url + "/locate", files=[("images", (name, data, "image/jpeg"))])
            latencies.append(time.perf_counter() - t)
            if r.status_code != 200 or r.json()[0].get("lat") is None:
                errors.append(f"{r.status_code} {r.text[:120]}")

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await client.post(url + "/locate", files=[("images", (blobs[0][0], blobs[0][1], "image/jpeg"))])  # warm
        t0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    lat = sorted(latencies)
    return {"concurrency": concurrency, "requests": len(lat), "errors": len(errors), "first_errors": errors[:3],
            "wall_s": round(wall, 2), "client_cpu_share": round(cpu / wall / (os.cpu_count() or 1), 3),
            "req_per_s": round(len(lat) / wall, 2),
            "p50_ms": round(1000 * statistics.median(lat), 1),
            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1)}


def serve(bundle: Path, max_batch: int, blobs, levels, requests: int, seconds: float) -> list[dict]:
    port = free_port()
    limits = Path(tempfile.mkdtemp(prefix="geo-bench-serve-")) / "limits.json"
    limits.write_text(json.dumps({"max_batch": max_batch, "queue_size": 256}))
    proc = subprocess.Popen([sys.executable, "-c", "from geo.cli import app; app()", "serve", "--index", str(bundle),
                             "--port", str(port), "--config", str(limits)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        rows = []
        for c in levels:
            row = asyncio.run(load(url, blobs, c, requests, seconds))
            row["max_batch"] = max_batch
            batches = [line for line in httpx.get(url + "/metrics").text.splitlines()
                       if line.startswith(("geo_batch_size_sum", "geo_batch_size_count"))]
            row["batch_metrics_cumulative"] = batches
            print(json.dumps(row), flush=True)
            rows.append(row)
        return rows
    finally:
        proc.terminate()
        proc.wait(15)


def _rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process in MB, from /proc (Linux)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _noise_jpeg(side: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


async def _maximal_request(url: str, blob: bytes, images: int) -> int:
    """One request with ``images`` copies of ``blob``, retried while the server says 503; returns the status."""
    files = [("images", (f"noise-{i}.jpg", blob, "image/jpeg")) for i in range(images)]
    async with httpx.AsyncClient(timeout=600) as client:
        for _ in range(600):
            r = await client.post(url + "/locate", files=files)
            if r.status_code != 503:
                return r.status_code
            await asyncio.sleep(float(r.headers.get("retry-after", "1")))
    return 503


def memory(bundle: Path, parallel: int, side: int) -> dict:
    """Peak and after-burst RSS of `geo serve` (default limits) under ``parallel`` maximal requests at once:
    16 noise JPEGs of ``side`` x ``side`` each (about 19 MB at 4100 px)."""
    blob = _noise_jpeg(side)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from geo.cli import app; app()", "serve", "--index", str(bundle),
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        asyncio.run(_maximal_request(url, blob, 1))  # warm: the model's first forward pass
        loaded, _ = _rss_mb(proc.pid)

        async def burst():
            return await asyncio.gather(*(_maximal_request(url, blob, 16) for _ in range(parallel)))

        t0 = time.perf_counter()
        statuses = asyncio.run(burst())
        wall = time.perf_counter() - t0
        time.sleep(5)
        after, peak = _rss_mb(proc.pid)
        return {"parallel": parallel, "image_mb": round(len(blob) / 2**20, 1), "statuses": statuses,
                "wall_s": round(wall, 1), "rss_loaded_mb": round(loaded), "rss_peak_mb": round(peak),
                "rss_after_mb": round(after)}
    finally:
        proc.terminate()
        proc.wait(15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--images", type=Path, help="folder of query photos (cycled); needed unless --memory")
    ap.add_argument("--memory", type=int, metavar="N", help="instead: peak RSS under N parallel maximal requests "
                    "(16 noise JPEGs of about 19 MB each), against the README's bound")
    ap.add_argument("--side", type=int, default=4100, help="--memory: the noise JPEGs' side in pixels")
    ap.add_argument("--requests", type=int, default=1000, help="requests per concurrency level (at most)")
    ap.add_argument("--seconds", type=float, default=120.0, help="time per concurrency level (at most)")
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--out", type=Path, default=Path("/tmp/geo-serve-bench.json"))
    args = ap.parse_args()
    if args.memory:
        print(json.dumps(memory(args.bundle, args.memory, args.side)))
        return
    if args.images is None:
        ap.error("--images is needed (or --memory N)")
    photos = expand_images([str(args.images)])
    blobs = [(Path(p).name, Path(p).read_bytes()) for p in photos]
    levels = [int(x) for x in args.levels.split(",")]
    load_before = os.getloadavg()
    result = {"load_before": load_before, "photos": len(photos), "bundle": str(args.bundle)}
    result["bare_batch1_per_s"] = round(bare(args.bundle, photos, 200, 1), 2)
    result["bare_batch16_per_s"] = round(bare(args.bundle, photos, 320, 16), 2)
    print(json.dumps({k: result[k] for k in ("bare_batch1_per_s", "bare_batch16_per_s")}), flush=True)
    result["server"] = (serve(args.bundle, 16, blobs, levels, args.requests, args.seconds)
                        + serve(args.bundle, 1, blobs, levels, args.requests, args.seconds))
    result["load_after"] = os.getloadavg()
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nload average before {load_before[0]:.2f}, after {result['load_after'][0]:.2f}")
    print(f"bare GeoIndex.locate: {result['bare_batch1_per_s']:.1f} photos/s one per call, "
          f"{result['bare_batch16_per_s']:.1f} photos/s 16 per call\n")
    print("| max_batch | concurrency | requests | errors | p50 ms | p99 ms | req/s | vs bare batch-1 | client CPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in result["server"]:
        print(f"| {r['max_batch']} | {r['concurrency']} | {r['requests']} | {r['errors']} | {r['p50_ms']} | "
              f"{r['p99_ms']} | {r['req_per_s']} | {r['req_per_s'] / result['bare_batch1_per_s']:.2f}x | "
              f"{100 * r['client_cpu_share']:.0f}% |")
    if any(r["errors"] for r in result["server"]):
        raise SystemExit("errors under load: " + "; ".join(e for r in result["server"] for e in r["first_errors"]))


if __name__ == "__main__":
    main()
