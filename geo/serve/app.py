"""The HTTP service behind ``geo serve``: one loaded bundle, micro-batched answers, a map page.

Routes (``/docs`` lists them with their schemas):

* ``POST /locate``: images as multipart (form field ``images``, one or more) or
  JSON ``{"embeddings": [[...], ...], "ids": [...]}`` made by the bundle's
  backbone; options ``mode``, ``k``, ``min_confidence``, ``crops`` as query
  parameters. Answers are the objects of ``geo query --json``, in upload order;
  an unreadable image gets its ``error`` and the others their answers.
* ``GET /healthz`` (never needs the token), ``GET /info`` (``geo info --json``
  plus the modes), ``GET /metrics`` (Prometheus text).
* ``GET /gallery/{id}/thumbnail``: a small JPEG of a gallery photo by its id.
* ``GET /``: the map page, its code and map data served from the package.

Limits are checked before any pixel is decoded: the body size (413), the
request and part content types (415), the header's pixel count (422, the
decompression-bomb guard), then the queue's room (503 with ``Retry-After``)
and the request's time (504). No route reads a client-named path or URL, and
the service fetches nothing.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from geo.core.answer import Answer
from geo.data.images import ImageLoadError, image_size
from geo.eval.report import json_safe
from geo.serve.batcher import Job, MicroBatcher, QueueFull
from geo.serve.metrics import CONTENT_TYPE, Metrics
from geo.serve.thumbnails import Thumbnails

STATIC = Path(__file__).parent / "static"
_ROUTES = ("/locate", "/healthz", "/info", "/metrics", "/docs", "/openapi.json", "/")
_IMAGE_TYPES_ALSO = ("application/octet-stream", "")  # curl and some clients send no image/* type


@dataclass(frozen=True)
class ServeSettings:
    """What ``geo serve`` is told; each maps to one of its options."""

    token: str | None = None
    max_batch: int = 16
    max_wait_ms: float = 5.0
    queue_size: int = 64
    max_images: int = 16
    max_upload_mb: float = 20.0
    max_pixels: int = 64_000_000
    timeout_s: float = 60.0
    io_threads: int = 2

    def __post_init__(self) -> None:
        if self.max_images > self.queue_size:
            raise ValueError(f"--max-images ({self.max_images}) cannot exceed --queue-size ({self.queue_size}): "
                             "such a request could never be queued")
        if min(self.max_images, self.queue_size, self.max_batch, self.io_threads) < 1 \
                or self.max_upload_mb <= 0 or self.max_pixels < 1 or self.timeout_s <= 0:
            raise ValueError("serve limits must be positive")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * (1 << 20))


# ---------------------------------------------------------------- ASGI guards
def _route_label(path: str) -> str:
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


async def _send_json(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Outermost of the app's own layers: metrics for every request, the token on every route but /healthz, the body-size cap.

    The cap is enforced on the declared Content-Length and again on the bytes
    actually received, so a chunked upload cannot slip past it.
    """

    def __init__(self, app, settings: ServeSettings, metrics: Metrics):
        self.app = app
        self.token = settings.token
        self.max_body = settings.max_images * settings.max_upload_bytes + (1 << 20)  # + multipart framing
        self.metrics = metrics

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
            self.metrics.observe(_route_label(scope["path"]), status[0], time.perf_counter() - start)

    async def _guarded(self, scope, receive, send):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.token is not None and scope["path"] != "/healthz" \
                and not token_matches(headers.get("authorization"), self.token):
            # the page gets a Basic challenge so a browser asks for the token itself; scripts use Bearer
            challenge = b'Basic realm="geo"' if scope["path"] == "/" else b'Bearer realm="geo"'
            return await _send_json(send, 401, "this server needs its token: Authorization: Bearer TOKEN",
                                    [(b"www-authenticate", challenge)])
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return await _send_json(send, 413, f"request body of {int(declared):,} bytes exceeds the server's "
                                               f"limit of {self.max_body:,} bytes")
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise HTTPException(413, f"request body exceeds the server's limit of {self.max_body:,} bytes")
            return message

        await self.app(scope, counted, send)


# ---------------------------------------------------------------- the app
def create_app(index: Any, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The FastAPI app over a :class:`~geo.query.index.GeoIndex` (its backbone is loaded here, once, on the
    model thread: see :mod:`geo.serve.batcher` for why one thread does all torch work)."""
    dim = int(index.bundle.manifest["dim"])
    io_pool = ThreadPoolExecutor(settings.io_threads, thread_name_prefix="geo-io")  # thumbnails: PIL, no torch
    batcher = MicroBatcher(index, settings.max_batch, settings.max_wait_ms, settings.queue_size)
    metrics = Metrics(batcher.depth)
    batcher.on_batch = metrics.batch_size.observe
    thumbs = Thumbnails(index.knn.ids, index.knn.paths)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            io_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="geo", version="1", lifespan=lifespan,
                  description="Where was this photo taken? Answers from a geo index bundle "
                              f"({index.bundle.root.name}); nothing is fetched or stored.")

    def _check_mode(mode: str | None) -> str:
        mode = mode or index.default_mode
        if mode not in index.modes:
            raise HTTPException(422, f"mode {mode!r} is not built in this index; built: {', '.join(index.modes)}")
        return mode

    async def _image_jobs(request: Request, mode: str, k: int, min_confidence: float | None,
                          crops: int) -> list[Job | Answer]:
        """One job per readable upload, after the type, size and pixel-count limits; header failures answered."""
        try:
            form = await request.form(max_files=settings.max_images, max_fields=16)
        except StarletteHTTPException as e:  # the multipart parser's own limits
            if "Too many files" in str(e.detail):
                raise HTTPException(413, f"more than {settings.max_images} images in one request "
                                         "(--max-images)") from None
            raise
        uploads = [f for f in form.getlist("images") if isinstance(f, UploadFile)]
        if not uploads:
            raise HTTPException(422, "no image in the form field 'images'")
        blobs: list[tuple[str, bytes]] = []
        for i, f in enumerate(uploads):
            name = f.filename or f"image-{i + 1}"
            ctype = (f.content_type or "").split(";")[0].strip().lower()
            if not (ctype.startswith("image/") or ctype in _IMAGE_TYPES_ALSO):
                raise HTTPException(415, f"{name}: content type {ctype!r} is not an image")
            if (f.size or 0) > settings.max_upload_bytes:
                raise HTTPException(413, f"{name}: {f.size:,} bytes exceeds the {settings.max_upload_mb:g} MB "
                                         "upload limit (--max-upload-mb)")
            blobs.append((name, await f.read()))
        out: list[Job | Answer] = []
        for name, data in blobs:  # header only (PIL, microseconds): pixels are decoded on the model thread
            try:
                w, h = image_size(data, name)
            except ImageLoadError as e:
                if "decompression bomb" in e.reason:
                    raise HTTPException(422, f"{name}: {e.reason}") from None
                out.append(Answer.failed(name, e.reason))
                continue
            if w * h > settings.max_pixels:
                raise HTTPException(422, f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of "
                                         f"{settings.max_pixels:,} (--max-pixels)")
            out.append(Job(name, mode, k, min_confidence, data=data, crops=crops))
        return out

    async def _embedding_jobs(request: Request, mode: str, k: int, min_confidence: float | None) -> list[Job | Answer]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPException(422, f"request body is not JSON ({e})") from None
        rows = body.get("embeddings") if isinstance(body, dict) else None
        if not isinstance(rows, list) or not rows:
            raise HTTPException(422, 'JSON body must be {"embeddings": [[...], ...], "ids": [...] (optional)}')
        if len(rows) > settings.queue_size:
            raise HTTPException(413, f"{len(rows)} embeddings exceed the queue's {settings.queue_size} (--queue-size)")
        ids = body.get("ids") or [str(i) for i in range(len(rows))]
        if not isinstance(ids, list) or len(ids) != len(rows):
            raise HTTPException(422, f"'ids' must list one id per embedding ({len(rows)})")
        out: list[Job | Answer] = []
        for rid, row in zip(ids, rows):
            try:
                v = np.asarray(row, np.float32)
            except (TypeError, ValueError):
                out.append(Answer.failed(None, "not a list of numbers", id=str(rid)))
                continue
            if v.ndim not in (1, 2) or v.shape[-1] != dim:
                out.append(Answer.failed(None, f"shape {list(v.shape)}, this index holds {dim}-d embeddings",
                                         id=str(rid)))
            elif not np.isfinite(v).all():
                out.append(Answer.failed(None, "non-finite values", id=str(rid)))
            else:
                out.append(Job(None, mode, k, min_confidence, embedding=v, id=str(rid)))
        return out

    @app.post("/locate", summary="Locate uploaded images (multipart field 'images') or embeddings (JSON)",
              openapi_extra={"requestBody": {"content": {
                  "multipart/form-data": {"schema": {"type": "object", "required": ["images"], "properties": {
                      "images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
                  "application/json": {"schema": {"type": "object", "required": ["embeddings"], "properties": {
                      "embeddings": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                      "ids": {"type": "array", "items": {"type": "string"}}}}}}}})
    async def locate(request: Request,
                     mode: Optional[str] = Query(None, description="fused | knn | gallery | cells | regression "
                                                 "(default: fused when built)"),
                     k: int = Query(50, ge=1, le=1000, description="neighbours retrieved from the image index"),
                     min_confidence: Optional[float] = Query(None, ge=0, le=1, description="abstain below this"),
                     crops: int = Query(1, description="test-time crops: 1, 3 or 5")) -> JSONResponse:
        mode = _check_mode(mode)
        if crops not in (1, 3, 5):
            raise HTTPException(422, f"crops must be 1, 3 or 5, not {crops}")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        with batcher.arriving():
            if ctype == "multipart/form-data":
                items = await _image_jobs(request, mode, k, min_confidence, crops)
            elif ctype == "application/json":
                items = await _embedding_jobs(request, mode, k, min_confidence)
            else:
                raise HTTPException(415, f"send images as multipart/form-data (field 'images') or embeddings as "
                                         f"application/json, not {ctype or 'no content type'!r}")
            jobs = [j for j in items if isinstance(j, Job)]
            try:
                futures = batcher.submit(jobs) if jobs else []
            except QueueFull as e:
                raise HTTPException(503, f"busy: {e}; retry shortly", headers={"Retry-After": "1"}) from None
        if jobs:
            try:
                answers = await asyncio.wait_for(asyncio.gather(*futures), settings.timeout_s)
            except asyncio.TimeoutError:
                for f in futures:
                    f.cancel()
                raise HTTPException(504, f"no answer within {settings.timeout_s:g} s (--timeout-s)") from None
            found = dict(zip(map(id, jobs), answers))
            items = [found[id(j)] if isinstance(j, Job) else j for j in items]
        metrics.images.inc(len(items))
        metrics.image_errors.inc(sum(1 for a in items if a.error))
        return JSONResponse(json_safe([a.to_dict() for a in items]))

    @app.get("/healthz", summary="200 once the bundle and model are loaded (never needs the token)")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "photos": len(index.knn.ids), "modes": index.modes}

    @app.get("/info", summary="What the bundle holds, as `geo info --json`, and the modes it answers in")
    async def info() -> JSONResponse:
        return JSONResponse(json_safe({**index.bundle.summary(sha256_checked=False), "modes": index.modes,
                                       "default_mode": index.default_mode}))

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE)

    @app.get("/gallery/{photo_id}/thumbnail", summary="A small JPEG of a gallery photo, by its id in the bundle",
             responses={200: {"content": {"image/jpeg": {}}}, 404: {}})
    async def thumbnail(photo_id: str) -> Response:
        if photo_id not in thumbs:
            raise HTTPException(404, f"no photo {photo_id!r} in this index")
        data = await asyncio.get_running_loop().run_in_executor(io_pool, thumbs.get, photo_id)
        if data is None:
            raise HTTPException(404, f"photo {photo_id!r}: its file is no longer readable where the bundle recorded it")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Guard, settings=settings, metrics=metrics)
    return app


