"""Where and in what precision models run (one rule for the backbone, the heads and the gallery), and how
fast this machine multiplies matrices (what build-time estimates divide by), and how many threads an answer
gets.

"auto" means CUDA when torch sees a GPU, else the CPU; half precision is a
GPU matter (fp16/bf16 asked for on a CPU fall back to fp32 with a warning:
slow there and no gain).
"""
from __future__ import annotations

import sys
import time
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch

from geo.core.shared import SharedSetting

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISION_NAMES = {v: k for k, v in PRECISIONS.items()}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' | 'cpu' | 'cuda[:N]' -> a torch device; asking for CUDA without one is a ValueError."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available")
    return dev


def resolve_precision(precision: str, dev: torch.device) -> torch.dtype:
    """'auto' is fp16 on CUDA and fp32 elsewhere."""
    if precision != "auto" and precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, fp32, fp16 or bf16, not {precision!r}")
    if dev.type != "cuda":
        if precision in ("fp16", "bf16"):
            warnings.warn(f"precision {precision} ignored on {dev.type}: using fp32", stacklevel=3)
        return torch.float32
    return torch.float16 if precision == "auto" else PRECISIONS[precision]


def matmul_flops(size: int = 768, repeat: int = 10) -> float:
    """This machine's float32 matrix-multiply speed (flop/s, best of ``repeat``): what time estimates divide by."""
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / max(best, 1e-9)


# A warm query's one row: its small layers run as numpy products (geo.models.numpy_eval), where torch's per-call
# cost and its MKL path were most of their time. More rows go through torch, whose per-row results do not depend
# on the batch's size (numpy's do), so a build does not depend on the blocks that bound its memory.
NUMPY_ROWS = 1


@contextmanager
def one_row_threads(rows: int) -> Iterator[None]:
    """Within the block, one thread for an answer of :data:`NUMPY_ROWS` rows: numpy's BLAS, where its products
    (the gallery projection, the cell heads) run, and this thread's OpenMP team, which FAISS's searches use.
    Other rows keep every thread.

    - BLAS: the products are memory-bound, and a second thread only wakes a BLAS pool that then fights torch's
      threads, still spinning after the forward pass: the gallery search took 6.8 ms instead of 0.7, and the
      next forward 2.5x its time.
    - OpenMP: FAISS scans one query on one thread whatever it is allowed (its loops run over queries), yet with
      two allowed, one search of a 10,500 x 512 flat index took 1.7-1.8 ms against 0.7-0.95 on one, and kept the
      other core busy: the whole answer on a bundle of that size took 10.1-10.8 ms against 8.4-8.6
      (benchmarks/RESULTS.md).

    BLAS's setting is the process's: overlapping blocks (a server's model threads) share one, restored when the
    last ends. Each library is set directly (4 us); threadpoolctl's ``limit`` reads every library's state
    first, 0.15 ms of a warm query. OpenMP's is the calling thread's own."""
    if rows != NUMPY_ROWS:
        yield
        return
    with _ONE_THREAD.held(), _one_openmp_thread():
        yield


@contextmanager
def _one_openmp_thread() -> Iterator[None]:
    """This thread's OpenMP team at one thread, through FAISS: the runtime its parallel loops use, of the two
    that torch's and FAISS's wheels each bring."""
    import faiss  # loaded already: the answer searches with it

    n = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(n)


def _one_thread() -> list[tuple[Any, int]]:
    before = [(lib, lib.num_threads) for lib in _blas()]
    for lib, _ in before:
        _set_threads(lib, 1)
    return before


def _restore(before: list[tuple[Any, int]]) -> None:
    for lib, n in before:
        _set_threads(lib, n)


def _set_threads(lib: Any, n: int) -> None:
    """``lib.set_num_threads(n)``, from whichever thread calls. threadpoolctl (3.8) lets one Python thread own
    the setting of an OpenBLAS with its own thread pool and silently ignores every other thread's: a server's
    second model thread then answered its one-row queries on both BLAS threads, and OpenBLAS's worker spun on
    the first model thread's core (1.5-8 ms of CPU a request, benchmarks/RESULTS.md). Here every change is made
    under :data:`_ONE_THREAD`'s lock, so the claim is handed to the calling thread first."""
    hand_over = getattr(type(lib), "clear_controlling_thread", None)
    if hand_over is not None:
        hand_over(force=True)
    lib.set_num_threads(n)


_ONE_THREAD = SharedSetting(_one_thread, _restore)


def _blas() -> list[Any]:
    """threadpoolctl's controllers of the loaded BLAS libraries. Finding them costs milliseconds, so they are
    found again only when modules were imported since (an import is how another BLAS gets loaded: scikit-learn's
    SciPy, say, after a first answer had found only numpy's and FAISS's)."""
    global _BLAS
    if _BLAS is None or _BLAS[0] != len(sys.modules):
        from threadpoolctl import ThreadpoolController  # scikit-learn's dependency; loaded on a query's first product
        found = ThreadpoolController().select(user_api="blas").lib_controllers
        _BLAS = len(sys.modules), found
    return _BLAS[1]


_BLAS: tuple[int, list[Any]] | None = None  # (modules imported when found, controllers)
