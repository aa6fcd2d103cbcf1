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
"""
from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from geo.core.shared import SharedSetting

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 1 << 20


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
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


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
