"""A process-wide setting that overlapping blocks hold together (nested ones, or one per thread of a server):
applied when the first block begins, undone when the last one ends, so no block undoes it under another."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator


class SharedSetting:
    """``apply()`` returns what ``undo`` needs to restore the setting as it was."""

    def __init__(self, apply: Callable[[], Any], undo: Callable[[Any], None]):
        self._apply, self._undo = apply, undo
        self._lock = threading.Lock()
        self._holders = 0
        self._before: Any = None

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            if not self._holders:
                self._before = self._apply()
            self._holders += 1
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if not self._holders:
                    self._undo(self._before)
