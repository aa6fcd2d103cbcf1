"""The outermost of the app's own layers: metrics for every request, the token, the body-size cap.

It is plain ASGI rather than a route dependency so that it sees every request (static files, /docs,
unknown paths) and can refuse a body before any of it is read.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import time

from fastapi import HTTPException

from geo.serve.state import ServeState

_ROUTES = ("/locate", "/healthz", "/info", "/metrics", "/docs", "/openapi.json", "/")


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


class Guard:
    """Metrics, the token on every route but /healthz, and the body-size cap.

    The cap is enforced on the declared Content-Length and again on the bytes
    actually received, so a chunked upload cannot slip past it.
    """

    def __init__(self, app, state: ServeState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_status)
        finally:
            self.state.metrics.observe(route_label(scope["path"]), status[0], time.perf_counter() - start)

    async def _guarded(self, scope, receive, send):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        token = self.state.token
        if token is not None and scope["path"] != "/healthz" and not token_matches(headers.get("authorization"), token):
            # the page gets a Basic challenge so a browser asks for the token itself; scripts use Bearer
            challenge = b'Basic realm="geo"' if scope["path"] == "/" else b'Bearer realm="geo"'
            return await send_json(send, 401, "this server needs its token: Authorization: Bearer TOKEN",
                                   [(b"www-authenticate", challenge)])
        max_body = self.state.limits.max_form_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            return await send_json(send, 413, f"request body of {int(declared):,} bytes exceeds the server's "
                                              f"limit of {max_body:,} bytes")
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_body:
                    raise HTTPException(413, f"request body exceeds the server's limit of {max_body:,} bytes")
            return message

        await self.app(scope, counted, send)
