"""What every route of one app shares: index, batcher, limits, token, metrics and the bodies in flight.

One :class:`ServeState` per app lives on ``app.state.geo``; routes get it through the :func:`app_state`
dependency, so they are plain module-level functions rather than closures inside ``create_app``.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request

from geo.serve.batcher import MicroBatcher, model_threads_for
from geo.serve.limits import ServeLimits
from geo.serve.metrics import Metrics
from geo.serve.thumbnails import Thumbnails


class Inflight:
    """Bytes of request bodies being held, across all clients: the server's memory bound (``max_inflight_mb``).

    A request reserves its declared length (the cap when it declares none) until it is answered; one that
    does not fit beside the others is refused at once (503), and one larger than the budget is served alone.
    The event loop is the only user, so no lock.
    """

    def __init__(self, budget: int):
        self.budget = budget
        self.held = 0

    def take(self, size: int) -> bool:
        """Reserve ``size`` bytes, or False when they do not fit (a request without a body always does)."""
        if size and self.held and self.held + size > self.budget:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held -= size


@dataclass
class ServeState:
    """One served bundle and what serving it needs; ``index`` is a GeoIndex (see CONTRACTS for what is used)."""

    index: Any
    limits: ServeLimits
    token: str | None
    batcher: MicroBatcher
    metrics: Metrics
    thumbs: Thumbnails
    io_pool: ThreadPoolExecutor  # thumbnails: PIL only, never torch (see geo/serve/batcher.py)
    inflight: Inflight

    @classmethod
    def for_index(cls, index: Any, limits: ServeLimits, token: str | None) -> "ServeState":
        """Everything but the batcher's worker task, which starts with the app (it needs the running loop)."""
        batcher = MicroBatcher(index, limits.max_batch, limits.max_wait_ms, limits.queue_size,
                               model_threads=model_threads_for(index, limits.model_threads))
        inflight = Inflight(limits.max_inflight_bytes)
        metrics = Metrics(batcher.depth, lambda: inflight.held)
        batcher.on_batch = metrics.batch_size.observe
        batcher.on_part = lambda part, seconds: metrics.model_seconds.labels(part).inc(seconds)
        return cls(index, limits, token, batcher, metrics, Thumbnails(index.knn.ids, index.knn.paths),
                   ThreadPoolExecutor(limits.io_threads, thread_name_prefix="geo-io"), inflight)

    @property
    def dim(self) -> int:
        return int(self.index.bundle.manifest["dim"])

    def check_mode(self, mode: str | None) -> str:
        """The mode asked for (the bundle's default when none), or 422 naming the modes built."""
        mode = mode or self.index.default_mode
        if mode not in self.index.modes:
            raise HTTPException(422, f"mode {mode!r} is not built in this index; built: {', '.join(self.index.modes)}")
        return mode


def app_state(request: Request) -> ServeState:
    """The FastAPI dependency every route takes its state from."""
    return request.app.state.geo
