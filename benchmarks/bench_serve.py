"""`geo serve` under load: latency and throughput over loopback, against a bare batched forward in the same run.

    python benchmarks/bench_serve.py --bundle /tmp/srv/bundle --images /work/shared/data/osv5m-sample/images

Measures, in one run on one machine:

* bare forward: the backbone alone, in a process of its own, on the same photos, in batches of 4, 8 and 16
  (`--forward-batches`): decode, preprocess and one forward pass a batch, nothing else (no search, no
  answer). The headline is the batching server's rate at concurrency 8 over the fastest of them, before or
  after the servers (issue 25: at least 0.9);
* bare: `GeoIndex.locate` in this process on the same photos, one photo per call (what a naive
  per-request server does) and 16 per call;
* the server (`geo serve` as its own process) with micro-batching (max_batch 16) and without
  (max_batch 1, both set through `--config`; `--max-batches`), each at concurrency 1, 8 and 32: up to --requests
  requests (one photo each, multipart, as `curl -F images=@x.jpg` sends them, from a lean raw-socket client)
  or --seconds, whichever ends first;
* the bare forward again after the servers, so that a change in the machine's load shows.

The machine's 1-minute load average is recorded beside every number. On a loaded machine the bare forward
and the server do not see the same machine even seconds apart, so the server also reports where its model
thread's time went (``geo_model_seconds``): decode, forward and answer per photo, and the share of the
wall clock its decode and forward filled, which is the server's rate over its own bare forward in the same
process and moment (1.0: nothing but the forward pass limits it). The CPU a request costs is given for the
whole server, its event loop, and its busiest threads one by one, so a worker that spins beside the model
threads shows.

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

from geo.data.images import decode_tensor, expand_images  # noqa: E402


def bare_forward(bundle: Path, blobs: list[tuple[str, bytes]], n: int, batch: int, cores: int = 0) -> tuple[float, float]:
    """(photos per second, CPU ms a photo) through the backbone alone, ``batch`` uploads a forward pass (decoded
    and preprocessed as the server does): the floor under any server's cost. Run in a process of its own
    (:func:`bare_forward_process`) that loads nothing else (no FAISS, no stages), on a thread of its own as the
    server's model thread runs it, and timed on a second pass over the same ``n`` photos: on this loaded machine
    a process's first pass ran at a third of the next one's rate (the server is warmed the same way by the
    concurrency-1 level before concurrency 8), and a worker thread's passes ran 1.35x the main thread's.

    ``cores`` > 0: that many threads instead, each forwarding every ``cores``-th batch on one core, side by
    side, as the server's model threads run on a CPU (the stricter floor: the same layout without a server)."""
    from concurrent.futures import ThreadPoolExecutor

    from geo.serve.batcher import _one_core

    threads = max(cores, 1)
    with ThreadPoolExecutor(threads, initializer=_one_core if cores else None) as pool:
        from geo.models.backbones import backbone_from_spec

        bb = pool.submit(backbone_from_spec, json.loads((bundle / "manifest.json").read_text())["backbone"]).result()
        todo = [blobs[i % len(blobs)] for i in range(max(n, len(blobs)))]
        starts = list(range(0, len(todo), batch))

        def share(k: int) -> None:
            import torch

            for start in starts[k::threads]:
                bb.embed(torch.cat([decode_tensor(data, name, bb.preprocess) for name, data in todo[start:start + batch]]))

        def one_pass() -> tuple[float, float]:
            t0, cpu0 = time.perf_counter(), time.process_time()
            for f in [pool.submit(share, k) for k in range(threads)]:
                f.result()
            return len(todo) / (time.perf_counter() - t0), 1000 * (time.process_time() - cpu0) / len(todo)

        one_pass()
        return one_pass()


def bare_forward_process(bundle: Path, images: Path, n: int, batch: int, cores: int = 0) -> tuple[float, float]:
    """:func:`bare_forward` in a fresh process, as the server is one."""
    out = subprocess.run([sys.executable, __file__, "--bundle", str(bundle), "--images", str(images),
                          "--bare", str(n), "--bare-forward", str(batch), "--bare-cores", str(cores)],
                         capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return got["per_s"], got["cpu_ms"]


def bare(bundle: Path, photos: list[str], n: int, batch: int) -> tuple[float, float]:
    """(photos per second, CPU ms a photo) through GeoIndex.locate, ``batch`` photos per call, after a warm-up
    pass over every photo."""
    from geo.query.index import open_index

    idx = open_index(bundle)
    for start in range(0, len(photos), batch):
        idx.locate(photos[start:start + batch])
    todo = [photos[i % len(photos)] for i in range(n)]
    t0, cpu0 = time.perf_counter(), time.process_time()
    for start in range(0, n, batch):
        idx.locate(todo[start:start + batch])
    return n / (time.perf_counter() - t0), 1000 * (time.process_time() - cpu0) / n


def _locate_request(url: str, name: str, data: bytes) -> bytes:
    """One ``POST /locate`` with one photo, multipart as ``curl -F images=@x.jpg`` sends it, encoded once."""
    boundary = "geo-bench-7f3a9c"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    host = url.split("//", 1)[1]
    return (f"POST /locate HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes]:
    """Send one pre-encoded request on a kept-alive connection; (status, body) of its answer (Content-Length)."""
    writer.write(request)
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    fields = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head[1:] if ":" in line)}
    if "content-length" not in fields:
        raise RuntimeError(f"the server answered without Content-Length: {head[0]}")
    return int(head[0].split()[1]), await reader.readexactly(int(fields["content-length"]))


async def load(url: str, blobs: list[tuple[str, bytes]], concurrency: int, requests: int, seconds: float) -> dict:
    """``concurrency`` clients, each on one kept-alive connection, posting photos back to back.

    The client shares the server's cores, so it is kept lean: each request's bytes are encoded once and
    written to a raw asyncio stream, which costs a fraction of httpx's CPU a request (its share of the
    machine is reported as ``client_cpu_share``). Every answer is still parsed and checked."""
    latencies: list[float] = []
    errors: list[str] = []
    sent = 0
    deadline = time.perf_counter() + seconds
    encoded = [_locate_request(url, name, data) for name, data in blobs]
    host, port = url.split("//", 1)[1].split(":")

    async def worker() -> None:
        nonlocal sent
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            try:
                await _exchange(reader, writer, encoded[0])  # warm the connection
            except BaseException:
                await ready.abort()  # no client waits for one that will never come
                raise
            await ready.wait()  # every connection open and warmed, then the clock starts
            while sent < requests and time.perf_counter() < deadline:
                request = encoded[sent % len(encoded)]
                sent += 1
                t = time.perf_counter()
                status, body = await _exchange(reader, writer, request)
                latencies.append(time.perf_counter() - t)
                if status != 200 or json.loads(body)[0].get("lat") is None:
                    errors.append(f"{status} {body[:120]!r}")
        finally:
            writer.close()

    ready = asyncio.Barrier(concurrency + 1)
    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await ready.wait()
    t0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*tasks)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    lat = sorted(latencies)
    return {"concurrency": concurrency, "requests": len(lat), "errors": len(errors), "first_errors": errors[:3],
            "wall_s": round(wall, 2), "client_cpu_share": round(cpu / wall / (os.cpu_count() or 1), 3),
            "req_per_s": round(len(lat) / wall, 2),
            "p50_ms": round(1000 * statistics.median(lat), 1),
            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1)}


_TOTALS = ("geo_batch_size_sum", "geo_batch_size_count", 'geo_model_seconds_total{part="decode"}',
           'geo_model_seconds_total{part="forward"}', 'geo_model_seconds_total{part="answer"}')


def _batch_totals(url: str) -> tuple[float, ...]:
    """(images, batches, decode s, forward s, answer s) the server's model thread has run so far, from /metrics."""
    got = {line.split()[0]: float(line.split()[1]) for line in httpx.get(url + "/metrics").text.splitlines()
           if line.startswith(_TOTALS)}
    return tuple(got.get(k, 0.0) for k in _TOTALS)


def serve(bundle: Path, max_batch: int, model_threads: int, blobs, levels, requests: int, seconds: float) -> list[dict]:
    port = free_port()
    limits = Path(tempfile.mkdtemp(prefix="geo-bench-serve-")) / "limits.json"
    limits.write_text(json.dumps({"max_batch": max_batch, "queue_size": 256, "model_threads": model_threads}))
    proc = subprocess.Popen([sys.executable, "-c", "from geo.cli import app; app()", "serve", "--index", str(bundle),
                             "--port", str(port), "--config", str(limits)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        rows = []
        for c in levels:
            before, cpu, threads = _batch_totals(url), _cpu_s(proc.pid), _threads_cpu_s(proc.pid)
            row = asyncio.run(load(url, blobs, c, requests, seconds))
            images, batches, decode, forward, answer = (a - b for a, b in zip(_batch_totals(url), before))
            loop_s, all_s = (1000 * (a - b) / max(row["requests"], 1) for a, b in zip(_cpu_s(proc.pid), cpu))
            per_thread = sorted((s - threads.get(t, 0.0) for t, s in _threads_cpu_s(proc.pid).items()), reverse=True)
            row.update(max_batch=max_batch, model_threads=model_threads, mean_batch=round(images / max(batches, 1), 1), load=_load(),
                       server_cpu_ms=round(all_s, 1), event_loop_cpu_ms=round(loop_s, 1),
                       busiest_threads_cpu_ms=[round(1000 * s / max(row["requests"], 1), 1) for s in per_thread[:4]],
                       model_ms={k: round(1000 * v / max(images, 1), 2) for k, v in
                                 (("decode", decode), ("forward", forward), ("answer", answer))},
                       # the model thread's own decode + forward rate, in this run and process, over the server's:
                       own_forward_share=round((decode + forward) / row["wall_s"], 3))
            print(json.dumps(row), flush=True)
            rows.append(row)
        return rows
    finally:
        proc.terminate()
        proc.wait(15)


def _cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) of a process's main thread, its event loop in `geo serve`, and of all its
    threads (the model thread, torch's and FAISS's workers) so far, from /proc (Linux)."""
    return _used(Path(f"/proc/{pid}/task/{pid}/stat")), _used(Path(f"/proc/{pid}/stat"))


def _threads_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of each of a process's threads so far, by thread id. The busiest show where a request's CPU
    goes: the model threads, the event loop, and any library's worker that spins beside them (numpy's OpenBLAS
    worker took 1.5-8 ms a request before 86754cb)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[tid] = _used(Path(f"/proc/{pid}/task/{tid}/stat"))
        except OSError:  # a thread that ended between the listing and the read
            pass
    return out


def _used(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _load() -> float:
    """The 1-minute load average now (the machine is shared: every number is reported beside it)."""
    return round(os.getloadavg()[0], 2)


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
    ap.add_argument("--requests", type=int, default=300, help="requests per concurrency level (at most)")
    ap.add_argument("--seconds", type=float, default=120.0, help="time per concurrency level (at most)")
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--max-batches", default="16,1", help="server settings to run (max_batch), in order")
    ap.add_argument("--bare", type=int, default=320, help="photos per bare measurement")
    ap.add_argument("--forward-batches", default="4,8,16", help="batch sizes of the bare forward (the headline takes "
                    "the fastest; 4 is about the batch the server forms at concurrency 8)")
    ap.add_argument("--no-locate", action="store_true", help="skip the bare GeoIndex.locate rows")
    ap.add_argument("--bare-forward", type=int, metavar="BATCH", help=argparse.SUPPRESS)  # bare_forward_process
    ap.add_argument("--bare-cores", type=int, default=0, help=argparse.SUPPRESS)  # bare_forward_process
    ap.add_argument("--model-threads", default="0", help="server settings to run (model_threads: 0 one per core, "
                    "1 one thread on every core), in order, for each --max-batches")
    ap.add_argument("--out", type=Path, default=Path("/tmp/geo-serve-bench.json"))
    args = ap.parse_args()
    if args.memory:
        print(json.dumps(memory(args.bundle, args.memory, args.side)))
        return
    if args.images is None:
        ap.error("--images is needed (or --memory N)")
    photos = expand_images([str(args.images)])
    blobs = [(Path(p).name, Path(p).read_bytes()) for p in photos]
    if args.bare_forward:
        rate, cpu = bare_forward(args.bundle, blobs, args.bare, args.bare_forward, args.bare_cores)
        print(json.dumps({"per_s": rate, "cpu_ms": cpu}))
        return
    levels = [int(x) for x in args.levels.split(",")]
    result = _measure(args, photos, blobs, levels)
    args.out.write_text(json.dumps(result, indent=2))
    _print(result)
    if any(r["errors"] for r in result["server"]):
        raise SystemExit("errors under load: " + "; ".join(e for r in result["server"] for e in r["first_errors"]))


def _measure(args, photos: list[str], blobs: list[tuple[str, bytes]], levels: list[int]) -> dict:
    """Bare forward (before and after the servers, to bracket them), bare locate, then each server setting."""
    result: dict = {"load_before": os.getloadavg(), "photos": len(photos), "bundle": str(args.bundle), "bare": []}

    def bare_row(what: str, batch: int, measured: tuple[float, float]) -> None:
        result["bare"].append({"what": what, "batch": batch, "per_s": round(measured[0], 2),
                               "cpu_ms": round(measured[1], 1), "load": _load()})
        print(json.dumps(result["bare"][-1]), flush=True)

    sizes = [int(b) for b in args.forward_batches.split(",")]
    cores = len(os.sched_getaffinity(0))
    for b in sizes:
        bare_row("forward (before)", b, bare_forward_process(args.bundle, args.images, args.bare, b))
        bare_row(f"forward, {cores} batches side by side (before)", b,
                 bare_forward_process(args.bundle, args.images, args.bare, b, cores))
    if not args.no_locate:
        bare_row("GeoIndex.locate", 1, bare(args.bundle, photos, args.bare // 2, 1))
        bare_row("GeoIndex.locate", 16, bare(args.bundle, photos, args.bare, 16))
    result["server"] = [row for m in args.max_batches.split(",") for t in args.model_threads.split(",")
                        for row in serve(args.bundle, int(m), int(t), blobs, levels, args.requests, args.seconds)]
    for b in sizes:
        bare_row("forward (after)", b, bare_forward_process(args.bundle, args.images, args.bare, b))
        bare_row(f"forward, {cores} batches side by side (after)", b,
                 bare_forward_process(args.bundle, args.images, args.bare, b, cores))
    result["load_after"] = os.getloadavg()
    return result


def _print(result: dict) -> None:
    """The markdown tables RESULTS.md quotes, and the headline ratios: against the best bare batched forward on
    every core (issue 25's floor) and against the best bare forward of one batch a core side by side."""
    forward = max(r["per_s"] for r in result["bare"] if r["what"].startswith("forward ("))
    side = max((r["per_s"] for r in result["bare"] if "side by side" in r["what"]), default=float("nan"))
    print(f"\nload average before {result['load_before'][0]:.2f}, after {result['load_after'][0]:.2f}\n")
    print("| bare | photos a call | photos/s | CPU ms a photo | load |\n|---|---|---|---|---|")
    for r in result["bare"]:
        print(f"| {r['what']} | {r['batch']} | {r['per_s']:.1f} | {r['cpu_ms']} | {r['load']:.2f} |")
    print("\n| max_batch | model threads | concurrency | requests | errors | mean batch | p50 ms | p99 ms | req/s | "
          "vs best bare forward (side by side) | model threads' ms a photo: decode / forward / answer | their decode + "
          "forward time over the wall | server CPU ms/req (event loop) | busiest threads' CPU ms/req | client CPU | "
          "load |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["server"]:
        m = r["model_ms"]
        print(f"| {r['max_batch']} | {r['model_threads'] or 'one a core'} | {r['concurrency']} | {r['requests']} | "
              f"{r['errors']} | {r['mean_batch']} | {r['p50_ms']} | {r['p99_ms']} | {r['req_per_s']} | "
              f"{r['req_per_s'] / forward:.2f}x ({r['req_per_s'] / side:.2f}x) | "
              f"{m['decode']} / {m['forward']} / {m['answer']} | {r['own_forward_share']:.2f} | "
              f"{r['server_cpu_ms']} ({r['event_loop_cpu_ms']}) | {' / '.join(map(str, r['busiest_threads_cpu_ms']))} | "
              f"{100 * r['client_cpu_share']:.0f}% | "
              f"{r['load']:.2f} |")
    cpu = min(r["cpu_ms"] for r in result["bare"] if r["what"].startswith("forward"))
    for r in (r for r in result["server"] if r["max_batch"] > 1 and r["concurrency"] == 8):
        print(f"\nheadline, model_threads {r['model_threads']}: server at concurrency 8 / best bare batched forward = "
              f"{r['req_per_s'] / forward:.2f} (issue 25: >= 0.9), / best bare forward side by side = "
              f"{r['req_per_s'] / side:.2f}; in CPU, the bare forward's {cpu} ms a photo / the server's "
              f"{r['server_cpu_ms']} ms a request = {cpu / r['server_cpu_ms']:.2f}")


if __name__ == "__main__":
    main()
