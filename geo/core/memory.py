"""Handing freed memory back to the operating system between a build's stages.

Why: a build's peak is the high-water mark of one process that runs every stage in turn. Memory a stage
freed is not always memory the process gives back. glibc keeps freed blocks below its mmap threshold in
its heaps, and that threshold rises (up to 32 MB) each time a large block is freed, so the next stage's
FAISS lists and NumPy blocks land in heaps that are never trimmed. Arrow's pool (mimalloc) keeps what
it freed, too. At 150K x 1280, RSS after the kNN stage was 1.6 GB above what live objects held, and every
later stage added to it. So a build pins the threshold at 1 MiB (big blocks are mapped and unmapped as
they are freed) and trims the heaps and Arrow's pool after each stage.

Each trim begins with a garbage collection, which walked every object of the process (some 300K of torch,
pandas and the caller's own: 0.15-0.25 s a pass, more in a process that has done other work) after each stage and
each ingested piece. A build and an addition run with the heap they found frozen (:func:`own_garbage_only`), so a
pass walks what they made: a 51-photo build in one process took 8.3 s instead of 8.8.

A large build also holds its training sample in float16 (:func:`compact_rows`): the cell heads and the GPS
gallery read it a batch at a time, cast to float32, so half the bytes are held through every trained stage.

A forward pass wants the opposite: its feature maps are freed and allocated again, batch after batch, at the same
sizes, and each one mapped fresh is faulted in page by page (25,460 page faults a forward pass of 8 photos). So
a process that runs one keeps blocks up to :data:`FEATURE_MAPS_KEPT` in its heaps (:func:`keep_feature_maps`),
and a build does so only for its embedding stage (:func:`feature_maps_kept`), then maps large blocks again.
"""
from __future__ import annotations

import ctypes
import gc
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from geo.core.shared import SharedSetting

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD = 1 << 20
TRIM_THRESHOLD = 128 << 10  # glibc's default
# Blocks up to this size stay in the heaps while forward passes run, and up to this much of them is kept free:
# EfficientNet-Lite0's feature maps at a batch of 64 photos (the embedding stage's) are up to 308 MB, 38 MB at 8;
# at 256 MB, a batch of 64 still faulted its widest maps in.
FEATURE_MAPS_KEPT = 512 << 20
# Set in the environment, these tune malloc already: a user's choice stands
MALLOC_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
_policy: str | None = None  # "build" once map_large_blocks ran, "feature maps" once keep_feature_maps did


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # musl and other libcs: nothing to tune, nothing lost
        return None


def map_large_blocks() -> None:
    """Blocks of 1 MiB and more are mapped on their own and returned when freed (a fixed threshold: glibc's
    dynamic one stops rising). Called once when a build starts."""
    global _policy
    _policy = "build"
    _thresholds(MMAP_THRESHOLD, TRIM_THRESHOLD)


def keep_feature_maps() -> None:
    """Before a forward pass on the CPU: outside a build, keep blocks up to :data:`FEATURE_MAPS_KEPT` in the heaps,
    from now on (a query's or a server's next pass wants them again). A build's policy stands: it keeps them for
    its embedding stage alone (:func:`feature_maps_kept`). EfficientNet-Lite0's forward took 0.55-0.65x its time
    at batches of 8 to 64 (benchmarks/RESULTS.md)."""
    global _policy
    if _policy is None and _tunable():
        _policy = "feature maps"
        _thresholds(FEATURE_MAPS_KEPT, FEATURE_MAPS_KEPT)


@contextmanager
def feature_maps_kept() -> Iterator[None]:
    """A build's embedding stage: within the block, its forward passes keep their feature maps in the heaps;
    after it, large blocks are mapped on their own again and what the heaps hold free is given back."""
    if _policy != "build" or not _tunable():
        yield
        return
    _thresholds(FEATURE_MAPS_KEPT, FEATURE_MAPS_KEPT)
    try:
        yield
    finally:
        _thresholds(MMAP_THRESHOLD, TRIM_THRESHOLD)
        release_unused()


def _tunable() -> bool:
    return _libc() is not None and not any(name in os.environ for name in MALLOC_ENVIRONMENT)


def _thresholds(mmap: int, trim: int) -> None:
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, mmap)
        libc.mallopt(M_TRIM_THRESHOLD, trim)


def release_unused() -> None:
    """Collect garbage, then give the heaps' and Arrow's free memory back: what one stage leaves to the next."""
    gc.collect()
    if "pyarrow" in sys.modules:
        sys.modules["pyarrow"].default_memory_pool().release_unused()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _freeze() -> None:
    gc.collect()
    gc.freeze()


_frozen = SharedSetting(_freeze, lambda _: gc.unfreeze())


@contextmanager
def own_garbage_only() -> Iterator[None]:
    """Within the block, the garbage collector passes over what was alive when it began: it is collected once
    first, so nothing left over is garbage, and frozen (``gc.freeze``) until the outermost such block ends.

    Correct whatever the block does: an object frozen here and dropped inside is collected after the block,
    not lost. Nested and concurrent blocks in one process share one freeze, lifted when the last ends."""
    with _frozen.held():
        yield


def compact_rows(emb: np.ndarray) -> np.ndarray:
    """``emb`` contiguous, as float16 if it is (a large build's training sample: its consumers cast a batch at a
    time) and float32 otherwise. Never a float32 copy of a float16 sample: that would undo what it saves."""
    return np.ascontiguousarray(emb, dtype=np.float16 if emb.dtype == np.float16 else np.float32)
