"""Picking a column by name: the one matching rule for every alias table (``geo.data.columns``, the split's groups).

It sits in core, not beside the alias tables in ``geo.data.columns``, because the
photographer split (``geo.core.splits.group_column``) needs it and core imports nothing above it.
"""
from __future__ import annotations

from typing import Iterable


def find_column(columns: Iterable, candidates: tuple[str, ...]) -> str | None:
    """The first column matching the candidates in priority order, case-insensitively; an exact-case match wins a tie."""
    columns = [str(c) for c in columns]
    for cand in candidates:
        hits = [c for c in columns if c.lower() == cand.lower()]
        if hits:
            return cand if cand in hits else hits[0]
    return None
