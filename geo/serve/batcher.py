"""Micro-batching: concurrent requests share forward passes and FAISS searches.

A request puts one job per image on a bounded queue and awaits the jobs'
futures. Each worker task takes the first waiting job, gathers more for at most
``max_wait_ms`` (or until ``max_batch``) while other requests are still being
read, and runs the whole batch on a model thread of its own: every decoded image through one
``embed_tensors`` call, then one ``locate_embeddings`` call per distinct (mode, k, crops, coverage). While
that runs, new jobs queue up, so a loaded server forms full batches without waiting at all.

Only model threads run torch or FAISS work: they load the backbone, decode the uploads, embed and search.
On a CPU there is one per core, each running its ops on one core (``torch.set_num_threads(1)`` and FAISS's
OpenMP likewise, per thread), so two batches run side by side instead of one batch across both cores: on
the 2-core machine EfficientNet-Lite0 forwards 29.0 photos/s as two single-core batches against 22.3 as one
two-core batch (a forward's small convolutions leave a second core half idle). What must not happen is two
threads each with a multi-core OpenMP team: with libgomp every thread that runs a parallel ATen op gets its
own team, and two two-thread teams on two cores took a forward pass from 38 to 63-69 ms and kept it there
(benchmarks/RESULTS.md, "Serving"). A GPU keeps one model thread: the device batches, not the cores. A full
queue refuses a request at once (the server answers 503 with ``Retry-After``) instead of letting latency
grow without bound.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

from geo.core.answer import Answer
from geo.core.runtime import resolve_device
from geo.data.constraint import Constraint
from geo.stages.cells.region import DEFAULT_COVERAGE
from geo.data.images import ImageLoadError, decode_tensor

log = logging.getLogger("geo.serve")


class QueueFull(Exception):
    """The queue has no room for a request's images."""


@dataclass
class Job:
    """One uploaded image (its bytes, decoded on a model thread) or one precomputed embedding
    ([dim] or [crops, dim])."""

    name: str | None
    mode: str
    k: int
    min_confidence: float | None
    data: bytes | None = None
    crops: int = 1
    coverage: float = DEFAULT_COVERAGE  # the region's stated coverage
    embedding: np.ndarray | None = None
    id: str | None = None
    within: Constraint | None = None  # a query-time constraint (geo.data.constraint)
    future: asyncio.Future = field(default=None, repr=False)  # type: ignore[assignment]
    waiting: bool = False  # counted in the queue's depth: queued, not yet taken into a batch nor given up

    @property
    def weight(self) -> int:
        """What the job counts against the queue: an image 1, an embedding its vectors (a [crops, dim] row: crops)."""
        return 1 if self.embedding is None or self.embedding.ndim == 1 else int(self.embedding.shape[0])


class MicroBatcher:
    """The queue and the worker that drains it; ``run_batch`` is the model work (swappable in tests)."""

    def __init__(self, index: Any, max_batch: int = 16, max_wait_ms: float = 5.0, queue_size: int = 64,
                 on_batch: Callable[[int], None] | None = None, model_threads: int = 1):
        """``index`` is a GeoIndex (or anything with its ``backbone``, ``embed_tensors`` and
        ``locate_embeddings``); its backbone is loaded on a model thread here, once. ``model_threads``
        (:func:`model_threads_for`): batches run side by side, each on one core when there are several."""
        if max_batch < 1 or queue_size < 1 or max_wait_ms < 0 or model_threads < 1:
            raise ValueError("max_batch, queue_size and model_threads must be at least 1 and max_wait_ms at least 0")
        self.index = index
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.queue_size = queue_size
        self.on_batch = on_batch
        self.on_part: Callable[[str, float], None] | None = None  # (part, seconds) of each batch, on its model thread
        self._queue: asyncio.Queue[Job] | None = None
        self._waiting = 0  # jobs still wanted and not yet in a batch; a timed-out request's jobs leave at once
        self._arriving = 0  # requests being read that will submit jobs: only they are worth waiting for
        self._tasks: list[asyncio.Task] = []
        self.model_threads = model_threads
        self._model_thread = ThreadPoolExecutor(model_threads, thread_name_prefix="geo-model",
                                                initializer=_one_core if model_threads > 1 else None)
        self.preprocess = self.on_model_thread(lambda: index.backbone.preprocess)

    def on_model_thread(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on a model thread and wait for it (startup work that touches torch)."""
        return self._model_thread.submit(fn).result()

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._queue = asyncio.Queue()  # bounded by the count of jobs still wanted (``_waiting``), not by slots
        self._tasks = [asyncio.create_task(self._worker(), name=f"geo-batcher-{i}") for i in range(self.model_threads)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._model_thread.shutdown(wait=True, cancel_futures=True)

    def depth(self) -> int:
        """Images and embedding vectors waiting for the model (what ``/metrics`` reports, what the queue's limit
        counts)."""
        return self._waiting

    # ------------------------------------------------------------ requests
    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Around reading a request that will submit jobs: while any is being read, a batch waits for it (up to
        ``max_wait_ms``); with none, a lone request is answered without waiting for company that will not come."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    def submit(self, jobs: list[Job]) -> list[asyncio.Future]:
        """Queue all of a request's jobs or none of them (QueueFull): a request is never half-accepted."""
        assert self._queue is not None, "start() the batcher first"
        if self._waiting + sum(j.weight for j in jobs) > self.queue_size:
            raise QueueFull(f"{self._waiting} images or vectors are waiting; the queue holds {self.queue_size}")
        loop = asyncio.get_running_loop()
        for job in jobs:
            job.future = loop.create_future()
            job.future.add_done_callback(lambda _f, j=job: self._leave(j))  # cancelled on timeout: room at once
            job.waiting = True
            self._waiting += job.weight
            self._queue.put_nowait(job)
        return [j.future for j in jobs]

    def _leave(self, job: Job) -> None:
        if job.waiting:
            job.waiting = False
            self._waiting -= job.weight
            if job.future.cancelled():  # given up while queued: keep no bytes until the worker drops it
                job.data = job.embedding = None

    # ------------------------------------------------------------ the worker
    async def _next(self, timeout: float | None) -> Job | None:
        """The next job still wanted (a timed-out request's jobs are dropped here), or None after ``timeout``."""
        assert self._queue is not None
        while True:
            if self._queue.empty() and timeout is not None and timeout <= 0:
                return None
            try:
                job = self._queue.get_nowait() if not self._queue.empty() else \
                    await asyncio.wait_for(self._queue.get(), timeout)
            except asyncio.TimeoutError:
                return None
            if job.waiting:
                self._leave(job)
                return job

    async def _gather(self) -> list[Job]:
        batch = [await self._next(None)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            job = await self._next(deadline - loop.time() if self._arriving else 0)
            if job is None:
                break
            batch.append(job)
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            live = [j for j in batch if not j.future.done()]
            if not live:
                continue
            try:
                answers = await loop.run_in_executor(self._model_thread, self.run_batch, live)
            except Exception as e:  # a model failure fails this batch's requests, never the server
                log.exception("batch of %d failed", len(live))
                for j in live:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            if self.on_batch is not None:
                self.on_batch(len(live))
            for j, a in zip(live, answers):
                if not j.future.done():
                    j.future.set_result(a)

    @contextmanager
    def _timed(self, part: str) -> Iterator[None]:
        """Report the seconds a part of the batch took (``geo_model_seconds``: where the model threads' time goes)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.on_part is not None:
                self.on_part(part, time.perf_counter() - t0)

    def run_batch(self, jobs: list[Job]) -> list[Answer]:
        """Decode the image jobs, embed them in one forward pass, then answer each (mode, k, crops) group with
        one search; an image that cannot be decoded gets its error."""
        out: dict[int, Answer] = {}
        emb: dict[int, np.ndarray] = {id(j): np.asarray(j.embedding, np.float32).reshape(-1, j.embedding.shape[-1])
                                      for j in jobs if j.data is None}
        decoded: list[tuple[Job, torch.Tensor]] = []
        with self._timed("decode"):
            for j in jobs:
                if j.data is not None:
                    try:
                        decoded.append((j, decode_tensor(j.data, j.name or "upload", self.preprocess, j.crops)))
                    except ImageLoadError as e:
                        out[id(j)] = Answer.failed(j.name, e.reason)
                    except Exception as e:  # a decoder bug costs one image, not the batch
                        out[id(j)] = Answer.failed(j.name, f"unexpected {type(e).__name__}: {e}")
        if decoded:
            with self._timed("forward"):
                for (j, _), e in zip(decoded, self.index.embed_tensors([t for _, t in decoded])):
                    emb[id(j)] = e
        with self._timed("answer"):
            self._answer(jobs, emb, out)
        return [out[id(j)] for j in jobs]

    def _answer(self, jobs: list[Job], emb: dict[int, np.ndarray], out: dict[int, Answer]) -> None:
        """Each (mode, k, crops, constraint, coverage) group's answers into ``out``, one search a group."""
        groups: dict[tuple[str, int, int, Constraint | None, float], list[Job]] = {}
        for j in jobs:
            if id(j) in emb:
                groups.setdefault((j.mode, j.k, emb[id(j)].shape[0], j.within, j.coverage), []).append(j)
        for (mode, k, _, within, coverage), members in groups.items():
            answers = self.index.locate_embeddings(
                np.stack([emb[id(j)] for j in members]), mode=mode, k=k,
                names=[j.name for j in members], ids=[j.id for j in members], within=within, coverage=coverage)
            for j, a in zip(members, answers):
                out[id(j)] = a.abstain_below(j.min_confidence)


def model_threads_for(index: Any, asked: int = 0) -> int:
    """How many batches run side by side: ``asked`` when set, else one per CPU core this process may use on a
    CPU, and one on a GPU."""
    if asked:
        return asked
    if resolve_device(getattr(index, "device", "auto")).type != "cpu":  # without loading the backbone here
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _one_core() -> None:
    """A model thread's ops on one core: torch's and FAISS's OpenMP thread counts are per calling thread."""
    torch.set_num_threads(1)
    try:
        import faiss

        faiss.omp_set_num_threads(1)
    except ImportError:  # a stand-in index in tests
        pass
