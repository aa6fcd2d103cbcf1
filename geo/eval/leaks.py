"""The leakage guard of ``geo bench``: queries the gallery has already seen.

A query that is itself in the gallery (same id, same file, or a near-duplicate:
the same photo re-encoded or resized) is answered from memory, not located,
and scores near 100 % at 1 km. A query whose photographer has photos in the
gallery is answered partly from the same trip. The field's own benchmarks have
the second trap at scale (YFCC4k queries against MP-16 galleries share
photographers), so a score is only comparable to published ones when the
overlap is known. This module names each query's leak (the strongest reason);
``geo bench`` reports accuracy with and without them and marks the published
comparison when leaked queries are in it.

The bundle keeps no hash of its photos' bytes, so a byte-identical copy under
another name and id is caught as a near-duplicate: the same pixels give the
same embedding, similarity 1.0.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

# cosine similarity of the nearest gallery photo. With EfficientNet-Lite0 on the vendored OSV-5M gallery, ten
# gallery photos resized to 3/4 and re-encoded scored 0.959-0.990 against themselves (half size: 0.947), and
# no other photo above 0.72; `geo bench --leak-similarity` moves it for other backbones.
NEAR_DUPLICATE = 0.95
REASONS = ("same id", "same file", "near-duplicate", "same photographer")


def _norm(path: Any) -> str | None:
    return os.path.normpath(os.path.abspath(str(path))) if isinstance(path, str) and path else None


def _top_similarity(topk: Any) -> float:
    try:
        neighbours = json.loads(topk) if isinstance(topk, str) else None
        return float(neighbours[0]["similarity"]) if neighbours else float("nan")
    except (ValueError, KeyError, TypeError, IndexError):
        return float("nan")


def find_leaks(preds: pd.DataFrame, gallery_ids: np.ndarray, gallery_paths: np.ndarray | None = None,
               query_groups: pd.Series | None = None, gallery_groups: np.ndarray | None = None,
               near_duplicate: float = NEAR_DUPLICATE) -> pd.Series:
    """Per prediction row, why the query is not new to the gallery (one of :data:`REASONS`), or None.

    ``preds`` needs ``query_id``, ``path`` and ``topk`` (the answer's neighbours, best first).
    ``query_groups`` (aligned with ``preds``) and ``gallery_groups`` are photographers; without
    both the photographer check is skipped.
    """
    import pandas as pd

    ids = set(map(str, gallery_ids.tolist()))
    reason = pd.Series([None] * len(preds), index=preds.index, dtype=object)
    checks: list[tuple[str, pd.Series]] = [("same id", preds["query_id"].astype(str).isin(ids))]
    if gallery_paths is not None:
        paths = {_norm(p) for p in gallery_paths.tolist()}
        checks.append(("same file", preds["path"].map(_norm).isin(paths - {None})))
    similarity = preds["topk"].map(_top_similarity)
    checks.append(("near-duplicate", similarity >= near_duplicate))
    if query_groups is not None and gallery_groups is not None:
        known = {str(g) for g in gallery_groups.tolist() if g is not None and str(g) not in ("", "nan", "None")}
        q = query_groups.astype(object)
        checks.append(("same photographer", q.notna() & q.astype(str).isin(known)))
    for name, hit in reversed(checks):  # the strongest reason wins: it is written last
        reason[hit.to_numpy(bool)] = name
    return reason


def leak_counts(reason: pd.Series) -> dict[str, int]:
    return {r: int((reason == r).sum()) for r in REASONS if (reason == r).any()}
