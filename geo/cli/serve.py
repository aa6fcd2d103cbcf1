"""``geo serve``: keep a bundle and its model warm behind an HTTP API and a map page (``geo[server]``)."""
from __future__ import annotations

import dataclasses
import ipaddress
import os
from pathlib import Path
from typing import Optional

import typer

from geo.cli.common import fail
from geo.cli.options import Device
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
    host: str = typer.Option("127.0.0.1", help="Address to bind. Keep the default to answer this machine only; "
                             "change it (0.0.0.0) to expose the service, and the gallery's thumbnails, to the "
                             "network, with a --token."),
    port: int = typer.Option(8000, help="TCP port; change it when 8000 is taken or several bundles are served."),
    token: Optional[str] = typer.Option(None, envvar="GEO_TOKEN", help="Require `Authorization: Bearer TOKEN` on "
                                        "every route but /healthz (the map page asks for it as a password): set it "
                                        "whenever the host is not loopback. Also read from GEO_TOKEN, which keeps "
                                        "it out of `ps`."),
    device: Device = "auto",
    config: Optional[Path] = typer.Option(None, "--config", help="JSON or TOML file of serving limits (batch size, "
                                          "queue, upload and pixel caps, timeouts: the keys are listed in the "
                                          "README, 'Serve it'); change them on a GPU, for large uploads or for slow "
                                          "clients. Keys left out keep their defaults."),
    body_timeout_s: Optional[float] = typer.Option(None, "--body-timeout-s", min=0.001, help="Seconds a client has to "
                                                   "send a request's headers, then its body: a stalled or trickled "
                                                   "upload is answered 408 and its connection closed. Raise it for "
                                                   "large uploads over slow links. Default 30, or the --config "
                                                   "key read_timeout_s, which this overrides."),
) -> None:
    """Serve a bundle over HTTP: POST /locate, a map page at /, /info, /metrics, /healthz, /openapi.json.

    \b
      geo serve --index my-index                       # http://127.0.0.1:8000/
      curl -F images=@holiday.jpg http://127.0.0.1:8000/locate
      GEO_TOKEN=s3cret geo serve --index my-index --host 0.0.0.0 --config limits.toml

    The model and index load once; concurrent requests share forward passes.
    The server reads only the bundle and the photos it recorded (for thumbnails),
    never a path or URL from a client, and fetches nothing.
    """
    try:
        import uvicorn

        from geo.serve.app import LimitsError, ServeLimits, create_app, header_deadline_protocol, load_limits
    except ImportError as e:
        fail(f"geo serve needs the server extra ({e.name} is missing): pip install 'geo[server]'")

    try:
        limits = load_limits(config) if config is not None else ServeLimits()
        if body_timeout_s is not None:
            limits = dataclasses.replace(limits, read_timeout_s=body_timeout_s)
    except LimitsError as e:
        fail(e)
    idx = open_index(index, device=device)
    app = create_app(idx, limits, token=token or None)
    if not is_loopback(host):
        typer.secho(f"warning: binding {host}: other machines can send photos to this service and see the "
                    "gallery's thumbnails" + ("" if token else "; no --token / GEO_TOKEN is set, so anyone can"),
                    fg=typer.colors.YELLOW, err=True)
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"geo serve: {index} ({len(idx.knn.ids):,} photos, modes {', '.join(idx.modes)}) at "
               f"http://{shown}:{port}/" + (" (token required)" if token else ""), err=True)
    uvicorn.run(app, host=host, port=port, log_level=os.environ.get("GEO_LOG_LEVEL", "warning"),
                timeout_graceful_shutdown=5, http=header_deadline_protocol(limits.read_timeout_s))


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
