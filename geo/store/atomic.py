"""Atomic file writes and file hashes: a temp file in the same folder, then ``os.replace``.

An interruption at any point leaves either the old file or the new one under
the final name, never half of one (open_clip's and timm's checkpoint rule).
"""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from geo.core.sizes import human_bytes


class DiskSpaceError(OSError):
    """Not enough free space for what a stage is about to write; the message has the numbers."""


# Room kept beyond a stage's estimate: temp files live beside their final names until the rename.
_SPACE_MARGIN, _SPACE_FLOOR = 1.1, 16 << 20


def ensure_free_space(path: str | os.PathLike, need: int, what: str) -> None:
    """Refuse to start writing ``need`` bytes (an estimate) under ``path`` when its file system has less free.

    Checked before each build stage from its plan, so a full disk stops the build before an hour of work
    rather than after it."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    want = int(need * _SPACE_MARGIN) + _SPACE_FLOOR
    if free < want:
        raise DiskSpaceError(errno.ENOSPC, f"{what} needs about {human_bytes(want)} of disk and {probe} has "
                             f"{human_bytes(free)} free: free some space (or build elsewhere with --out) and re-run; "
                             "the build resumes where it stopped")


@functools.cache
def _file_mode() -> int:
    """What ``open()`` would give a new file under this process's umask (read once: os.umask can only be read
    by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, writer: Callable[[str], None]) -> Path:
    """Call ``writer(tmp_path)`` then rename onto ``path``; the temp file is removed on failure.

    mkstemp creates the temp file 0600; it gets the mode a plain write would have (the umask's) before the
    rename, so another account or a service can read an index the user's umask lets it read.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = ""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        writer(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        if disk_full(e):  # whatever the writer raised (safetensors, FAISS, Arrow), one error naming the file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        if isinstance(e, OSError) and e.errno is not None and _is_temp(e.filename, path):
            raise OSError(e.errno, e.strerror, str(path)) from e  # the path asked for, not our hidden temp file
        raise
    return path


def _is_temp(name: object, path: Path) -> bool:
    """Whether an error's file name is a temp file of :func:`atomic_write` for ``path`` (mkstemp's, whose random
    name an error from mkstemp itself also carries)."""
    return isinstance(name, str) and os.path.basename(name).startswith(f".{path.name}.") and name.endswith(".tmp")


_DISK_FULL_WORDS = ("No space left on device", "StorageFull", "os error 28")


def disk_full(e: BaseException) -> bool:
    """Whether ``e`` says the disk is full: an ENOSPC OSError, or a library's own error wrapping one (safetensors
    raises SafetensorError "IoError(Os { code: 28, kind: StorageFull, ... })", FAISS a RuntimeError)."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    return isinstance(e, Exception) and any(w in str(e) for w in _DISK_FULL_WORDS)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n").encode())


def atomic_write_parquet(path: str | os.PathLike, table, row_group_size: int | None = None) -> Path:
    """A Parquet file (zstd). ``row_group_size``: rows per row group (pyarrow's default: up to 1M, one
    group for a shard), what a reader and the writer hold at once."""
    import pyarrow.parquet as pq

    return atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size))


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """A ``.npy`` file; written through a file object, as ``np.save`` given a name adds ".npy" to the temp name."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    return atomic_write(path, write)


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_write_faiss(path: str | os.PathLike, index) -> Path:
    import faiss

    if hasattr(faiss, "index_gpu_to_cpu") and type(index).__name__.startswith("Gpu"):
        index = faiss.index_gpu_to_cpu(index)
    return atomic_write(path, lambda tmp: faiss.write_index(index, tmp))


def atomic_save_figure(path: str | os.PathLike, fig) -> Path:
    """A matplotlib figure, in the format its final name's suffix says (the temp file's name has none)."""
    fmt = Path(path).suffix.lstrip(".") or None
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt))


ROLLBACK_DIR = ".geo-rollback"


@contextmanager
def restored_on_failure(root: str | os.PathLike, rels: Iterable[str]) -> Iterator[None]:
    """The files ``rels`` (relative to ``root``) come back as they are now if the block raises (or if the process
    dies in it: the next call restores them before anything else).

    Each is hard-linked (copied where a link is impossible) under ``root/.geo-rollback/`` first; every geo
    write replaces a file instead of writing into it, so the link keeps the old content whatever the block
    writes. ``geo add`` holds the files it rewrites this way until its one commit of the manifest.
    """
    root = Path(root)
    keep = root / ROLLBACK_DIR
    restore_interrupted(root)  # a killed run's files, before this one's
    for rel in rels:
        if (root / rel).is_file():
            (keep / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(root / rel, keep / rel)
            except OSError:
                shutil.copy2(root / rel, keep / rel)
    try:
        yield
    except BaseException:
        _restore(root, keep)
        raise
    shutil.rmtree(keep, ignore_errors=True)


def restore_interrupted(root: str | os.PathLike) -> None:
    """Put back the files a killed :func:`restored_on_failure` block kept (none: nothing happens)."""
    _restore(Path(root), Path(root) / ROLLBACK_DIR)


def _restore(root: Path, keep: Path) -> None:
    """Every file kept under ``keep`` back to its place under ``root``, then ``keep`` removed."""
    if not keep.is_dir():
        return
    for f in sorted(p for p in keep.rglob("*") if p.is_file()):
        os.replace(f, root / f.relative_to(keep))
    shutil.rmtree(keep, ignore_errors=True)


def json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


