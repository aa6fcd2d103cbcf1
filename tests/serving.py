"""Helpers for the server tests: free loopback ports, `geo serve` as a real process, uvicorn in a thread."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 60.0, what: str = "the page"):
    """The first truthy value of ``predicate()``, polled every 0.2 s (a browser page's state, a server's)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not get there in {timeout:g} s")


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"geo serve exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not healthy after {timeout:g} s")


@contextmanager
def geo_serve(bundle: Path, *args: str, log: Path | None = None) -> Iterator[str]:
    """`geo serve --index BUNDLE ARGS` in its own process on a free loopback port; yields the base URL.
    With ``log``, the server's stderr goes to that file (to check what it logged)."""
    port = free_port()
    stderr = open(log, "w") if log is not None else subprocess.PIPE  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-c", "from geo.cli import app; app()", "serve", "--index", str(bundle),
                             "--host", "127.0.0.1", "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log is not None:
            stderr.close()


@contextmanager
def uvicorn_thread(app) -> Iterator[str]:
    """A real uvicorn server for an app built in this process (to swap the model work in tests)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout=30)
        yield url
    finally:
        server.should_exit = True
        thread.join(15)
