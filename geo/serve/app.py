"""The HTTP service behind ``geo serve``: one loaded bundle, micro-batched answers, a map page.

Routes (``/openapi.json`` lists them with their schemas; no ``/docs`` page, which would load from a CDN):

* ``POST /locate``: images as multipart (form field ``images``, one or more) or
  JSON ``{"embeddings": [[...], ...], "ids": [...]}`` made by the bundle's
  backbone; options ``mode``, ``k``, ``min_confidence``, ``crops`` as query
  parameters. Answers are the objects of ``geo query --json``, in upload order;
  an unreadable image gets its ``error`` and the others their answers.
* ``GET /healthz`` (never needs the token), ``GET /info`` (``geo info --json``
  plus the modes), ``GET /metrics`` (Prometheus text).
* ``GET /gallery/{id}/thumbnail``: a small JPEG of a gallery photo by its id.
* ``GET /``: the map page, its code and map data served from the package.

Limits are checked before any pixel is decoded or any JSON parsed: the
bytes of bodies in flight across all clients (503 with ``Retry-After``), the
body size (413; a JSON body's cap follows from the queue and the dimension),
the body's deadline (408), the request and part content types (415), the
header's pixel count (422, the decompression-bomb guard), then the queue's
room, counted in images and vectors (503 with ``Retry-After``) and the
request's time (504). Headers must arrive within the same deadline
(:mod:`geo.serve.connections`: slow-loris connections are closed). No route reads a client-named path or URL, and
the service fetches nothing.

The app is assembled here; the routes live in :mod:`geo.serve.routes` over one
:class:`~geo.serve.state.ServeState`, request bodies become jobs in
:mod:`geo.serve.inputs`, the token and body cap are :mod:`geo.serve.guard`'s,
and the limits are data (:mod:`geo.serve.limits`).
"""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from geo.serve.connections import header_deadline_protocol
from geo.serve.guard import Guard
from geo.serve.limits import LimitsError, ServeLimits, load_limits
from geo.serve.routes import STATIC, router
from geo.serve.state import ServeState

# what `geo serve` imports, lazily, from here (geo.cli.serve may import only this module inside a function)
__all__ = ["create_app", "header_deadline_protocol", "LimitsError", "ServeLimits", "load_limits"]


def create_app(index: Any, limits: ServeLimits = ServeLimits(), token: str | None = None) -> FastAPI:
    """The FastAPI app over a :class:`~geo.query.index.GeoIndex` (its backbone is loaded here, once, on the
    model thread: see :mod:`geo.serve.batcher` for why only model threads do torch work); ``token``, when given,
    is required on every route but /healthz."""
    state = ServeState.for_index(index, limits, token)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await state.batcher.start()
        try:
            yield
        finally:
            await state.batcher.stop()
            state.io_pool.shutdown(wait=False, cancel_futures=True)

    # No /docs or /redoc: FastAPI's pages load Swagger UI and ReDoc from a CDN (blank offline, and a third party
    # sees every visit); the schema is at /openapi.json for any viewer the user runs themselves.
    app = FastAPI(title="geo", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Where was this photo taken? Answers from a geo index bundle "
                              f"({index.bundle.root.name}); nothing is fetched or stored.")
    app.state.geo = state
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Guard, state=state)
    return app
