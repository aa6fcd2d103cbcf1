"""The routes, at module level over the app's :class:`~geo.serve.state.ServeState` (``Depends(app_state)``)."""
from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Annotated, Any, Optional

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from geo.core.answer import Answer
from geo.core.plain import json_safe
from geo.data.constraint import Constraint, constraint_from_options
from geo.stages.cells.region import DEFAULT_COVERAGE
from geo.serve.batcher import Job, QueueFull
from geo.serve.inputs import embedding_jobs, image_jobs
from geo.serve.metrics import CONTENT_TYPE
from geo.serve.state import ServeState, app_state

STATIC = Path(__file__).parent / "static"
State = Annotated[ServeState, Depends(app_state)]
router = APIRouter()

_LOCATE_BODY = {"requestBody": {"content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "application/json": {"schema": {"type": "object", "required": ["embeddings"], "properties": {
        "embeddings": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        "ids": {"type": "array", "items": {"type": "string"}}}}}}}}


@router.post("/locate", summary="Locate uploaded images (multipart field 'images') or embeddings (JSON)",
             openapi_extra=_LOCATE_BODY)
async def locate(request: Request, state: State,
                 mode: Optional[str] = Query(None, description="fused | knn | gallery | cells | regression "
                                             "(default: fused when built)"),
                 k: int = Query(50, ge=1, le=1000, description="neighbours retrieved from the image index"),
                 min_confidence: Optional[float] = Query(None, ge=0, le=1, description="abstain below this"),
                 crops: int = Query(1, description="test-time crops: 1, 3 or 5"),
                 within: Optional[str] = Query(None, description="answer only inside: countries (ISO alpha-2 or "
                                               "alpha-3 codes or names, comma-separated), box:S,W,N,E or "
                                               "near:LAT,LON,KM (as geo query --within)"),
                 within_weight: Optional[float] = Query(None, description="soft constraint: the mass outside is "
                                                        "multiplied by this (0 < w < 1)"),
                 coverage: float = Query(DEFAULT_COVERAGE, gt=0, le=1, description="the share of new photos whose "
                                         "truth the answer's region holds (conformally calibrated)")) -> JSONResponse:
    mode = state.check_mode(mode)
    if crops not in (1, 3, 5):
        raise HTTPException(422, f"crops must be 1, 3 or 5, not {crops}")
    constraint = await _constraint(state, mode, within, within_weight)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    with state.batcher.arriving():
        if ctype == "multipart/form-data":
            items = await image_jobs(state, request, mode, k, min_confidence, crops)
        elif ctype == "application/json":
            items = await embedding_jobs(state, request, mode, k, min_confidence)
        else:
            raise HTTPException(415, f"send images as multipart/form-data (field 'images') or embeddings as "
                                     f"application/json, not {ctype or 'no content type'!r}")
        jobs = [j for j in items if isinstance(j, Job)]
        for j in jobs:
            j.within = constraint
            j.coverage = coverage
        try:
            futures = state.batcher.submit(jobs) if jobs else []
        except QueueFull as e:
            raise HTTPException(503, f"busy: {e}; retry shortly", headers={"Retry-After": "1"}) from None
    answers = await _answers(state, items, jobs, futures)
    state.metrics.images.inc(len(answers))
    state.metrics.image_errors.inc(sum(1 for a in answers if a.error))
    return JSONResponse([a.to_dict() for a in answers])  # to_dict is plain JSON data already


async def _constraint(state: ServeState, mode: str, *options: Any) -> Constraint | None:
    """The request's query-time constraint, or 422 naming what is wrong (an unknown country, no gallery photo
    inside, a mode that cannot honour it). Its view of the index is built here, off the event loop, once per
    constraint; a model thread then finds it ready."""
    try:
        constraint = constraint_from_options(*options)
        if constraint is not None:
            await asyncio.get_running_loop().run_in_executor(state.io_pool, state.index.check_within, mode, constraint)
    except ValueError as e:
        raise HTTPException(422, str(e)) from None
    return constraint


async def _answers(state: ServeState, items: list[Job | Answer], jobs: list[Job], futures) -> list[Answer]:
    """Each item's answer in upload order: the model's for jobs (504 after ``timeout_s``), the error otherwise."""
    if not jobs:
        return items  # type: ignore[return-value]  # every item already failed
    timeout = state.limits.timeout_s
    try:
        answers = await asyncio.wait_for(asyncio.gather(*futures), timeout)
    except asyncio.TimeoutError:
        for f in futures:
            f.cancel()
        raise HTTPException(504, f"no answer within {timeout:g} s (timeout_s)") from None
    found = dict(zip(map(id, jobs), answers))
    return [found[id(j)] if isinstance(j, Job) else j for j in items]


@router.get("/healthz", summary="200 once the bundle and model are loaded (never needs the token)")
async def healthz(state: State) -> dict[str, Any]:
    return {"status": "ok", "photos": len(state.index.knn.ids), "modes": state.index.modes}


@router.get("/info", summary="What the bundle holds, as `geo info --json`, and the modes it answers in")
async def info(state: State) -> JSONResponse:
    index = state.index
    return JSONResponse(json_safe(without_paths({**index.bundle.summary(sha256_checked=False),
                                                 "modes": index.modes, "default_mode": index.default_mode})))


# an absolute path (POSIX, home-relative or with a drive letter), alone or after a backbone kind ("finetuned:",
# "open_clip:local-dir:")
_PATH = re.compile(r"(?P<spec>(?:[a-z_][a-z0-9_-]+:)*)(?P<path>(?:[A-Za-z]:[\\/]|/|~[/\\]?).*)", re.DOTALL)


def without_paths(value: Any) -> Any:
    """``value`` with every absolute path cut to its last part (``/home/me/.cache/w.pth`` -> ``w.pth``,
    ``finetuned:/srv/m`` -> ``finetuned:m``): a client learns which weights answer, not where the server keeps
    its files or who runs it. The sha256 beside each weights file still identifies it."""
    if isinstance(value, dict):
        return {k: without_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_paths(v) for v in value]
    found = _PATH.fullmatch(value) if isinstance(value, str) else None
    if found:
        return found["spec"] + found["path"].replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return value


@router.get("/metrics", summary="Prometheus metrics")
async def prometheus(state: State) -> Response:
    return Response(state.metrics.text(), media_type=CONTENT_TYPE)


@router.get("/gallery/{photo_id}/thumbnail", summary="A small JPEG of a gallery photo, by its id in the bundle",
            responses={200: {"content": {"image/jpeg": {}}}, 404: {}})
async def thumbnail(photo_id: str, state: State) -> Response:
    if photo_id not in state.thumbs:
        raise HTTPException(404, f"no photo {photo_id!r} in this index")
    data = await asyncio.get_running_loop().run_in_executor(state.io_pool, state.thumbs.get, photo_id)
    if data is None:
        raise HTTPException(404, f"photo {photo_id!r}: its file is no longer readable where the bundle recorded it")
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})
