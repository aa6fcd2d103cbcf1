"""One writer per bundle: a lock file naming its holder, stale locks detected, a killed run's temp files cleaned.

Why: two builds writing one bundle interleave shards and manifest commits, and a reader during a rebuild saw
files that no longer matched the manifest. ``geo build-index`` and ``geo add`` hold :func:`writing` for their
whole run: a second writer is refused at once with the holder's pid, host and command; a lock whose process
is gone (same host, pid dead or reused) is taken over; and the temp files of atomic writes that a killed run
left behind (:mod:`geo.store.atomic`) are removed, since no other writer can be mid-write. Readers never take
the lock; :func:`writer_active` tells them a mismatch may be a commit in progress, worth one more look.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

LOCK_FILE = ".geo-write.lock"
# atomic.py's temp names: "." + final name + "." + mkstemp's 8 random characters + ".tmp"
_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
# A lock file without readable content is a writer killed between creating and filling it (microseconds);
# past this age it is stale.
_EMPTY_LOCK_GRACE_S = 5.0


class BundleLocked(RuntimeError):
    """Another live process is writing the bundle; the message names it and says what to do."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not mistaken for the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the holder still runs. A lock from another host cannot be checked here, so it counts as alive."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = int(holder.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except (OSError, ValueError, OverflowError):
        return False
    started = holder.get("pid_start")
    return started is None or _start_time(pid) in (None, started)


def _holder(path: Path) -> dict[str, Any] | None:
    """The lock's content; None when it is empty or unreadable (a writer killed while creating it)."""
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def writer_active(root: str | os.PathLike) -> bool:
    """A live process holds the bundle's write lock."""
    path = Path(root) / LOCK_FILE
    if not path.exists():
        return False
    holder = _holder(path)
    return holder is not None and _alive(holder)


def _try_take(path: Path, me: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
    return True


def _refuse_or_clear(path: Path) -> None:
    """Raise for a live holder; remove a stale lock (its process is gone) so the caller can take it."""
    holder = _holder(path)
    if holder is None:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return
        if age < _EMPTY_LOCK_GRACE_S:
            raise BundleLocked(f"{path.parent}: another geo process is starting to write this bundle; try again")
    elif _alive(holder):
        raise BundleLocked(
            f"{path.parent}: another geo process is writing this bundle (pid {holder.get('pid')} on "
            f"{holder.get('host')}, since {holder.get('started')}: {holder.get('command')}); wait for it to "
            f"finish. If that process is gone (another machine, for instance), delete {path} and re-run.")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def clean_temp_files(root: Path) -> int:
    """Remove the temp files atomic writes leave when a run is killed mid-write; only safe under the lock."""
    removed = 0
    for p in root.rglob(".*.tmp"):
        if _TEMP.match(p.name) and p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed += 1
    return removed


@contextlib.contextmanager
def writing(root: str | os.PathLike, log: Callable[[str], None] = lambda m: None) -> Iterator[Path]:
    """Hold the bundle's write lock for the block (the folder is created when missing, and removed again if the
    block fails before writing anything into it)."""
    root = Path(root)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_FILE
    me = {"pid": os.getpid(), "pid_start": _start_time(os.getpid()), "host": socket.gethostname(),
          "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
          "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]}
    for _ in range(3):
        if _try_take(path, me):
            break
        _refuse_or_clear(path)
    else:
        raise BundleLocked(f"{root}: could not take the write lock {path}; another process keeps taking it")
    try:
        removed = clean_temp_files(root)
        if removed:
            log(f"removed {removed} temporary file(s) left by an interrupted run")
        yield root
    finally:
        if _holder(path) == me:
            path.unlink()
        if created and not any(root.iterdir()):
            root.rmdir()
