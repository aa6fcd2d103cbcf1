"""geo: tell where a photo was taken, from a feature index of geotagged photos.

``geo.open_index(dir).locate_one("photo.jpg")`` (one Answer) and ``.locate(paths)`` (a list of
Answers, one per photo found) are the Python API; the package
layout follows the pipeline (docs/ARCHITECTURE.md). ``open_index`` is resolved
on first use (PEP 562), so importing a light module such as ``geo.core.geodesy``
does not load torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_LAZY = {"open_index": "geo.query.index", "GeoIndex": "geo.query.index", "Answer": "geo.core.answer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'geo' has no attribute {name!r}")


__all__ = ["Answer", "GeoIndex", "open_index", "__version__"]
