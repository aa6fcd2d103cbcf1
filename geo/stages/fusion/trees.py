"""A gradient-boosted regressor as plain arrays: fitted with scikit-learn, stored as JSON, evaluated with numpy.

The bundle never holds a pickle (a pickle runs code when read, and breaks
across library versions), so the fitted trees are copied out into padded
arrays ``[trees, nodes]`` and the query side walks all trees at once, one
numpy step per tree level.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

_FIELDS = ("feature", "threshold", "left", "right", "leaf", "missing_left", "value")


@dataclass
class Trees:
    """Sum of regression trees: ``baseline + sum_t value_t(leaf of x in tree t)``."""

    baseline: float
    feature: np.ndarray       # int64 [trees, nodes]
    threshold: np.ndarray     # float64 [trees, nodes]: x <= threshold goes left
    left: np.ndarray          # int64 [trees, nodes]
    right: np.ndarray         # int64 [trees, nodes]
    leaf: np.ndarray          # bool [trees, nodes]
    missing_left: np.ndarray  # bool [trees, nodes]: where NaN goes
    value: np.ndarray         # float64 [trees, nodes]
    depth: int

    @classmethod
    def from_sklearn(cls, model: Any) -> "Trees":
        """Copy a fitted ``HistGradientBoostingRegressor`` (numeric features, squared error) into arrays."""
        nodes = [p[0].nodes for p in model._predictors]
        width = max(len(n) for n in nodes)

        def pad(field: str, dtype: type) -> np.ndarray:
            out = np.zeros((len(nodes), width), dtype)
            for i, n in enumerate(nodes):
                out[i, :len(n)] = n[field]
            return out

        leaf = pad("is_leaf", bool)
        leaf[:, :] |= np.arange(width)[None, :] >= np.array([len(n) for n in nodes])[:, None]  # padding is a leaf
        depth = max(int(n["depth"].max()) for n in nodes) if nodes else 0
        return cls(float(np.ravel(model._baseline_prediction)[0]), pad("feature_idx", np.int64),
                   pad("num_threshold", np.float64), pad("left", np.int64), pad("right", np.int64), leaf,
                   pad("missing_go_to_left", bool), pad("value", np.float64), depth)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """[rows] predictions for features [rows, F]: every tree walked at once, one level per step.

        Nodes are addressed flat (tree * width + node), so a level is a few 1-d takes and a comparison, over the
        (tree, row) pairs not yet at a leaf: the deepest tree sets ``depth``, but most pairs stop well before it
        (0.58 against 0.82 ms for a query's ~60 candidates through 100 trees when every pair walked every level)."""
        x = np.asarray(x)
        flat = self._flat
        n_trees, width = self.feature.shape
        rows = len(x)
        node = np.repeat(np.arange(n_trees, dtype=np.int64) * width, rows)  # [trees * rows], tree-major
        cols = np.tile(np.arange(rows, dtype=np.int64) * x.shape[1], n_trees)
        xs, nan = x.ravel(), bool(np.isnan(x).any())
        walking = np.flatnonzero(~flat["leaf"].take(node))
        for _ in range(self.depth):
            if not len(walking):
                break
            at = node.take(walking)
            v = xs.take(cols.take(walking) + flat["feature"].take(at))
            go_left = v <= flat["threshold"].take(at)
            if nan:
                go_left = np.where(np.isnan(v), flat["missing_left"].take(at), go_left)
            at = np.where(go_left, flat["left"].take(at), flat["right"].take(at))
            node[walking] = at
            walking = walking[~flat["leaf"].take(at)]
        return self.baseline + flat["value"].take(node).reshape(n_trees, rows).sum(axis=0)

    @cached_property
    def _flat(self) -> dict[str, np.ndarray]:
        """The arrays raveled, children as flat indices (made once)."""
        n_trees, width = self.feature.shape
        base = np.arange(n_trees, dtype=np.int64)[:, None] * width
        return {"feature": self.feature.ravel(), "threshold": self.threshold.ravel(), "leaf": self.leaf.ravel(),
                "missing_left": self.missing_left.ravel(), "value": self.value.ravel(),
                "left": (base + self.left).ravel(), "right": (base + self.right).ravel()}

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "depth": self.depth,
                **{f: getattr(self, f).tolist() for f in _FIELDS}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Trees":
        types = {"feature": np.int64, "left": np.int64, "right": np.int64, "leaf": bool, "missing_left": bool}
        return cls(float(d["baseline"]), depth=int(d["depth"]),
                   **{f: np.asarray(d[f], types.get(f, np.float64)) for f in _FIELDS})
