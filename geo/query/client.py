"""``geo query --server URL``: the same answers from a running ``geo serve``, printed as a local query prints them.

Photos are read here and uploaded in requests of at most ``batch`` images (the
server's ``--max-images``); a photo that cannot be read locally gets the same
error a local query gives, without a request. Answers come back as
:class:`~geo.core.answer.Answer` objects, their ``image`` set to the path as
given, so every output format is the local one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from geo.core.answer import Answer
from geo.data.constraint import Constraint
from geo.data.images import ImageLoadError, read_image_file

if TYPE_CHECKING:
    import httpx


class ServerError(RuntimeError):
    """The server could not be reached or refused the request; the message says which and why."""


def _detail(r: httpx.Response) -> str:
    try:
        return str(r.json().get("detail", r.text))
    except ValueError:
        return r.text[:200]


def locate_remote(server: str, paths: Sequence[str], *, token: str | None = None, mode: str | None = None,
                  k: int = 50, min_confidence: float | None = None, crops: int = 1, batch: int = 16,
                  timeout_s: float = 300.0, within: Constraint | None = None,
                  coverage: float | None = None) -> list[Answer]:
    """Answers for ``paths`` (already expanded) from the server at ``server``, in order."""
    url = server.rstrip("/") + "/locate"
    params = {k_: v for k_, v in (("mode", mode), ("k", k), ("min_confidence", min_confidence), ("crops", crops),
                                          ("coverage", coverage))
              if v is not None}
    if within is not None:  # its label reads back as the same constraint (geo.data.constraint.Constraint.parse)
        params["within"] = within.label()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    answers: list[Answer | None] = [None] * len(paths)
    readable: list[tuple[int, bytes]] = []
    for i, p in enumerate(paths):
        try:
            readable.append((i, read_image_file(p)))
        except ImageLoadError as e:
            answers[i] = Answer.failed(p, e.reason)
    import httpx  # here, not at the top: only --server needs it, and it cost every cold `geo query` 0.1 s

    with httpx.Client(timeout=timeout_s) as client:
        for start in range(0, len(readable), batch):
            part = readable[start:start + batch]
            files = [("images", (Path(paths[i]).name, data, "application/octet-stream")) for i, data in part]
            try:
                r = client.post(url, params=params, files=files, headers=headers)
            except httpx.HTTPError as e:
                raise ServerError(f"{server}: cannot reach the server ({e})") from None
            if r.status_code == 401:
                raise ServerError(f"{server}: the server needs its token (--token or GEO_TOKEN)")
            if r.status_code != 200:
                raise ServerError(f"{server}: {r.status_code} {_detail(r)}")
            got = r.json()
            if not isinstance(got, list) or len(got) != len(part):
                raise ServerError(f"{server}: expected {len(part)} answers, got {got!r:.200}")
            for (i, _), d in zip(part, got):
                a = Answer.from_dict(d)
                a.image = os.fspath(paths[i])
                answers[i] = a
    return [a for a in answers if a is not None]
