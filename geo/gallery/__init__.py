"""GPS gallery: a GeoCLIP-style location encoder matched against image embeddings.

The gallery of coordinates is encoded once at build time and searched with
FAISS at query time; see :mod:`geo.gallery.stage`.
"""
from __future__ import annotations

from geo.gallery.encoder import ImageProjection, LocationEncoder

__all__ = ["LocationEncoder", "ImageProjection"]
