"""Sizes in bytes: reading them from options, printing them for people, and this machine's memory."""
from __future__ import annotations

import os

SAFE_SHARE = 0.7  # of the machine's memory: the rest is the OS, the page cache and the model
# Of the build's memory (--memory), what the FAISS index may take: the kNN stage holds the index while it
# reads shards beside it, and a server later holds the same index beside the model and the other stages.
INDEX_SHARE = 0.5


def parse_bytes(text: str | int) -> int:
    """'4GB', '512MiB', '1e9' -> bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace("IB", "B")
    for unit, mult in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(float(s))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def default_memory() -> int:
    """A safe share of this machine's physical memory."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return int(total * SAFE_SHARE)


def index_budget(memory: int | None = None) -> int:
    """The FAISS index's budget (it picks Flat / IVF-Flat / IVF-PQ): a share of the build's ``memory``
    (default: a safe share of this machine's), so that one ``--memory`` bounds the build and its index."""
    return int((default_memory() if memory is None else memory) * INDEX_SHARE)
