"""A ``POST /locate`` body turned into batcher jobs, every limit checked before any pixel is decoded.

Images come as multipart (form field ``images``): the part's content type (415), its size (413) and the
pixel count in its header (422, the decompression-bomb guard) are checked here, on the event loop;
decoding happens on a model thread. Embeddings come as JSON ``{"embeddings": [...], "ids": [...]}``.
A failure that concerns one item (an unreadable image, a vector of the wrong length) becomes that item's
answer with its ``error``; one that concerns the request is an HTTP error.
"""
from __future__ import annotations

import json

import numpy as np
from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from geo.core.answer import Answer
from geo.data.embedding_table import unit_rows, vector_problems
from geo.data.images import ImageLoadError, image_size
from geo.serve.batcher import Job
from geo.serve.state import ServeState

_IMAGE_TYPES_ALSO = ("application/octet-stream", "")  # curl and some clients send no image/* type


async def image_jobs(state: ServeState, request: Request, mode: str, k: int, min_confidence: float | None,
                     crops: int) -> list[Job | Answer]:
    """One job per readable upload, after the type, size and pixel-count limits; header failures answered."""
    limits = state.limits
    try:
        form = await request.form(max_files=limits.max_images, max_fields=16)
    except StarletteHTTPException as e:  # the multipart parser's own limits
        if "Too many files" in str(e.detail):
            raise HTTPException(413, f"more than {limits.max_images} images in one request (max_images)") from None
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
        if (f.size or 0) > limits.max_upload_bytes:
            raise HTTPException(413, f"{name}: {f.size:,} bytes exceeds the {limits.max_upload_mb:g} MB "
                                     "upload limit (max_upload_mb)")
        blobs.append((name, await f.read()))
    return [_image_job(state, name, data, mode, k, min_confidence, crops) for name, data in blobs]


def _image_job(state: ServeState, name: str, data: bytes, mode: str, k: int, min_confidence: float | None,
               crops: int) -> Job | Answer:
    """The header only (PIL, microseconds): pixels are decoded on a model thread."""
    try:
        w, h = image_size(data, name)
    except ImageLoadError as e:
        if "decompression bomb" in e.reason:
            raise HTTPException(422, f"{name}: {e.reason}") from None
        return Answer.failed(name, e.reason)
    if w * h > state.limits.max_pixels:
        raise HTTPException(422, f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of "
                                 f"{state.limits.max_pixels:,} (max_pixels)")
    return Job(name, mode, k, min_confidence, data=data, crops=crops)


async def embedding_jobs(state: ServeState, request: Request, mode: str, k: int,
                         min_confidence: float | None) -> list[Job | Answer]:
    """One job per usable embedding, L2-normalised as ``geo query --embeddings`` normalises them.

    The body's size was capped before it was read (:class:`~geo.serve.guard.Guard`), which bounds the parse;
    the vectors (a 2-D row counts as its rows) are counted against the queue before any is converted. A row
    of the wrong shape gets its error; a zero or non-finite vector makes the request malformed (422).
    """
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPException(422, f"request body is not JSON ({e})") from None
    except RecursionError:
        raise HTTPException(422, "request body is nested too deeply to be the JSON /locate takes") from None
    rows = body.get("embeddings") if isinstance(body, dict) else None
    if not isinstance(rows, list) or not rows:
        raise HTTPException(422, 'JSON body must be {"embeddings": [[...], ...], "ids": [...] (optional)}')
    vectors = sum(len(r) if isinstance(r, list) and r and isinstance(r[0], list) else 1 for r in rows)
    queue_size = state.limits.queue_size
    if vectors > queue_size:
        raise HTTPException(413, f"{vectors} embedding vectors exceed the queue's {queue_size} (queue_size)")
    ids = body.get("ids") or [str(i) for i in range(len(rows))]
    if not isinstance(ids, list) or len(ids) != len(rows):
        raise HTTPException(422, f"'ids' must list one id per embedding ({len(rows)})")
    return [_embedding_job(state.dim, str(rid), row, mode, k, min_confidence) for rid, row in zip(ids, rows)]


def _embedding_job(dim: int, rid: str, row, mode: str, k: int, min_confidence: float | None) -> Job | Answer:
    try:
        v = np.asarray(row, np.float32)
    except (TypeError, ValueError, RecursionError):
        return Answer.failed(None, "not a list of numbers", id=rid)
    if v.ndim not in (1, 2) or v.shape[-1] != dim or v.size == 0:
        return Answer.failed(None, f"shape {list(v.shape)}, this index holds {dim}-d embeddings", id=rid)
    return Job(None, mode, k, min_confidence, embedding=_unit_rows(v, rid), id=rid)


def _unit_rows(v: np.ndarray, rid: str) -> np.ndarray:
    """Each vector of ``v`` ([dim] or [crops, dim]) scaled to length 1, as the index's own embeddings are;
    422 for a non-finite or zero vector, which has no direction to compare (the same rows
    ``geo query --embeddings`` refuses)."""
    problem = next((p for p in vector_problems(v) if p is not None), None)
    if problem is not None:
        raise HTTPException(422, f"embedding {rid!r} {problem}")
    return unit_rows(v)
