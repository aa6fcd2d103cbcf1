"""geo: tell where a photo was taken, from a feature index of geotagged photos."""
from __future__ import annotations

__version__ = "0.1.0"


def open_index(path, device: str = "auto", verify: bool = True):
    """Open an index bundle built by ``geo build-index``; returns a :class:`geo.retrieval.GeoIndex`."""
    from geo.retrieval.index import GeoIndex

    return GeoIndex.open(path, device=device, verify=verify)


__all__ = ["open_index", "__version__"]
