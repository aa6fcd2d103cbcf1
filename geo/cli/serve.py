"""``geo serve``: keep a bundle and its model warm behind an HTTP API and a map page (``geo[server]``)."""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Optional

import typer

from geo.cli.common import fail
from geo.query.index import open_index

_LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_command(
    index: Path = typer.Option(..., "--index", "-i", help="Bundle directory built by `geo build-index`."),
    host: str = typer.Option("127.0.0.1", help="Address to bind. The default answers this machine only; "
                             "0.0.0.0 exposes the service (and the gallery's thumbnails) to the network."),
    port: int = typer.Option(8000, help="TCP port."),
    token: Optional[str] = typer.Option(None, envvar="GEO_TOKEN", help="Require `Authorization: Bearer TOKEN` on "
                                        "every route but /healthz (the map page asks for it as a password). "
                                        "Also read from GEO_TOKEN, which keeps it out of `ps`."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    max_batch: int = typer.Option(16, help="Most images in one micro-batch (one forward pass, one FAISS search)."),
    max_wait_ms: float = typer.Option(5.0, help="How long the first image of a batch waits for others to join."),
    queue_size: int = typer.Option(64, help="Images that may wait for the model; beyond it requests get 503 "
                                   "with Retry-After."),
    max_images: int = typer.Option(16, help="Most images in one request."),
    max_upload_mb: float = typer.Option(20.0, help="Largest accepted image file (413 above it)."),
    max_pixels: int = typer.Option(64_000_000, help="Largest accepted image in pixels, read from its header "
                                   "before decoding (422 above it: decompression bombs)."),
    timeout_s: float = typer.Option(60.0, help="A request still waiting after this many seconds gets 504."),
    io_threads: int = typer.Option(2, help="Threads reading gallery photos for thumbnails (uploads are decoded on "
                                   "the model thread: one thread owns torch, see geo/serve/batcher.py)."),
) -> None:
    """Serve a bundle over HTTP: POST /locate, a map page at /, /info, /metrics, /healthz, docs at /docs.

    \b
      geo serve --index my-index                       # http://127.0.0.1:8000/
      curl -F images=@holiday.jpg http://127.0.0.1:8000/locate
      GEO_TOKEN=s3cret geo serve --index my-index --host 0.0.0.0

    The model and index load once; concurrent requests share forward passes.
    The server reads only the bundle and the photos it recorded (for thumbnails),
    never a path or URL from a client, and fetches nothing.
    """
    try:
        import uvicorn

        from geo.serve.app import ServeSettings, create_app
    except ImportError as e:
        fail(f"geo serve needs the server extra ({e.name} is missing): pip install 'geo[server]'")

    settings = ServeSettings(token=token or None, max_batch=max_batch, max_wait_ms=max_wait_ms,
                             queue_size=queue_size, max_images=max_images, max_upload_mb=max_upload_mb,
                             max_pixels=max_pixels, timeout_s=timeout_s, io_threads=io_threads)
    idx = open_index(index, device=device)
    app = create_app(idx, settings)
    if not is_loopback(host):
        typer.secho(f"warning: binding {host}: other machines can send photos to this service and see the "
                    "gallery's thumbnails" + ("" if token else "; no --token / GEO_TOKEN is set, so anyone can"),
                    fg=typer.colors.YELLOW, err=True)
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"geo serve: {index} ({len(idx.knn.ids):,} photos, modes {', '.join(idx.modes)}) at "
               f"http://{shown}:{port}/" + (" (token required)" if token else ""), err=True)
    uvicorn.run(app, host=host, port=port, log_level=os.environ.get("GEO_LOG_LEVEL", "warning"),
                timeout_graceful_shutdown=5)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
