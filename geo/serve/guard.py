"""The outermost of the app's own layers: metrics for every request, the token, the request body's limits.

It is plain ASGI rather than a route dependency so that it sees every request (static files, /openapi.json,
unknown paths) and can refuse a body before any of it is read.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import ctypes
import ctypes.util
import hmac
import json
import logging
import time
from typing import Callable

from fastapi import HTTPException
from starlette.requests import ClientDisconnect

from geo.serve.limits import MB
from geo.serve.state import ServeState

log = logging.getLogger("geo.serve")

_ROUTES = ("/locate", "/healthz", "/info", "/metrics", "/openapi.json", "/")


def route_label(path: str) -> str:
    """The metrics label of a path: a route's template, never a client's id (unbounded label values)."""
    if path.startswith("/gallery/"):
        return "/gallery/{id}/thumbnail"
    if path.startswith("/static/"):
        return "/static"
    return path if path in _ROUTES else "other"


def token_matches(header: str | None, token: str) -> bool:
    """``Bearer T`` (scripts) or ``Basic`` with T as the password (the browser's own login prompt), in constant time."""
    scheme, _, cred = (header or "").partition(" ")
    if scheme.lower() == "bearer":
        given = cred.strip()
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(cred.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    else:
        return False
    return hmac.compare_digest(given.encode(), token.encode())


async def send_json(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


TRIM_AFTER_BYTES = 8 * MB


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def give_back_freed_memory() -> None:
    """Hand freed heap pages back to the system (tens of microseconds), after a large body is answered: glibc
    keeps them otherwise, and resident memory would stay near its peak after a burst
    (``benchmarks/bench_serve.py --memory``)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class BodyTimeout(Exception):
    """The client did not send the whole body within ``read_timeout_s``."""


class Guard:
    """Metrics, the token on every route but /healthz, and the request body's cap, memory budget and deadline.

    The cap (a JSON body's much smaller than a form's) is enforced on the declared Content-Length and again on
    the bytes actually received, so a chunked upload cannot slip past it; the body must arrive within
    ``read_timeout_s`` of its headers (408 and the connection closed), which ends short bodies, multiparts
    that never close and trickles alike. A client that goes away mid-upload costs one log line, not a traceback.
    """

    def __init__(self, app, state: ServeState):
        self.app = app
        self.state = state
        self.inflight = state.inflight

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_status)
        except BodyTimeout:
            log.info("%s %s: body not received within %g s; closed", scope["method"], scope["path"],
                     self.state.limits.read_timeout_s)
            if not status[0]:
                await send_json(send_status, 408, f"request body not received within "
                                f"{self.state.limits.read_timeout_s:g} s (read_timeout_s)", [(b"connection", b"close")])
        except ClientDisconnect:
            log.info("%s %s: the client went away before sending its whole body", scope["method"], scope["path"])
            status[0] = status[0] or 499  # nginx's "client closed request", for the metrics only
        finally:
            self.state.metrics.observe(route_label(scope["path"]), status[0] or 500, time.perf_counter() - start)

    async def _guarded(self, scope, receive, send):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        token = self.state.token
        if token is not None and scope["path"] != "/healthz" and not token_matches(headers.get("authorization"), token):
            # the page gets a Basic challenge so a browser asks for the token itself; scripts use Bearer
            challenge = b'Basic realm="geo"' if scope["path"] == "/" else b'Bearer realm="geo"'
            return await send_json(send, 401, "this server needs its token: Authorization: Bearer TOKEN",
                                   [(b"www-authenticate", challenge)])
        is_json = headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"
        cap = self.state.limits.max_json_bytes(self.state.dim) if is_json else self.state.limits.max_form_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            return await send_json(send, 413, f"{'JSON ' if is_json else ''}request body of {int(declared):,} bytes "
                                              f"exceeds the server's limit of {cap:,} bytes")
        size = int(declared) if declared is not None and declared.isdigit() else \
            cap if "transfer-encoding" in headers else 0
        if not self.inflight.take(size):
            return await send_json(send, 503, f"busy: {self.inflight.held / MB:.1f} MB of requests are being read or "
                                              f"answered (max_inflight_mb); retry shortly", [(b"retry-after", b"1")])
        try:
            await self.app(scope, self._receiver(receive, cap), send)
        finally:
            self.inflight.give(size)
            if size >= TRIM_AFTER_BYTES:
                give_back_freed_memory()

    def _receiver(self, receive, cap: int):
        """``receive`` with the body's cap and deadline; once the body is whole, plain ``receive`` (which then
        waits only for a disconnect, as long as the answer takes)."""
        deadline = time.monotonic() + self.state.limits.read_timeout_s
        received, whole = 0, False

        async def counted():
            nonlocal received, whole
            if whole:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                raise BodyTimeout() from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise HTTPException(413, f"request body exceeds the server's limit of {cap:,} bytes")
                whole = not message.get("more_body", False)
            return message

        return counted
