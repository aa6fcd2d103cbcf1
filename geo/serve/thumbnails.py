"""Small JPEGs of gallery photos, named only by their id in the bundle.

The file behind an id is the path the bundle recorded when it was built; a
client never names a path. A photo whose file is gone, too large or not an
image has no thumbnail (404), and the decode runs under the same bomb guard
as indexing.
"""
from __future__ import annotations

import io
from collections import OrderedDict
from functools import cached_property
from pathlib import Path
from threading import Lock

import numpy as np

from geo.data.images import ImageLoadError, decode_rgb

THUMB_SIDE = 256
MAX_SOURCE_BYTES = 64 << 20


class Thumbnails:
    """id -> JPEG bytes for the photos of a kNN index (ids and recorded paths), with a small LRU cache."""

    def __init__(self, ids: np.ndarray, paths: np.ndarray, cache: int = 512):
        self._ids = ids
        self._paths = paths
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._size = cache
        self._lock = Lock()

    @cached_property
    def _row(self) -> dict[str, int]:
        """id -> row, built on the first thumbnail asked for: not at start-up (a million ids take a second)."""
        return {str(i): r for r, i in enumerate(self._ids.tolist())}

    def __contains__(self, photo_id: str) -> bool:
        return photo_id in self._row

    def get(self, photo_id: str) -> bytes | None:
        """The thumbnail, or None when the id is unknown or its file cannot be shown."""
        with self._lock:
            if photo_id in self._cache:
                self._cache.move_to_end(photo_id)
                return self._cache[photo_id]
        row = self._row.get(photo_id)
        if row is None:
            return None
        path = Path(str(self._paths[row]))
        try:
            if not path.is_file() or path.stat().st_size > MAX_SOURCE_BYTES:
                return None
            rgb = decode_rgb(path.read_bytes(), path)
        except (OSError, ImageLoadError):
            return None
        rgb.thumbnail((THUMB_SIDE, THUMB_SIDE))
        buf = io.BytesIO()
        rgb.save(buf, "JPEG", quality=80)
        data = buf.getvalue()
        with self._lock:
            self._cache[photo_id] = data
            if len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return data
