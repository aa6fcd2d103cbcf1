"""A gradient-boosted regressor as plain arrays: fitted with scikit-learn, stored as JSON, evaluated with numpy.

The bundle never holds a pickle (a pickle runs code when read, and breaks
across library versions), so the fitted trees are copied out into padded
arrays ``[trees, nodes]`` and the query side walks all trees at once, one
numpy step per tree level.
"""
from __future__ import annotations

from dataclasses import dataclass
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
        """[rows] predictions for features [rows, F]: every tree walked at once, one level per step."""
        x = np.asarray(x, np.float64)
        t = np.arange(len(self.feature))[:, None]
        rows = np.arange(len(x))[None, :]
        node = np.zeros((len(self.feature), len(x)), np.int64)
        for _ in range(self.depth):
            v = x[rows, self.feature[t, node]]
            go_left = np.where(np.isnan(v), self.missing_left[t, node], v <= self.threshold[t, node])
            node = np.where(self.leaf[t, node], node, np.where(go_left, self.left[t, node], self.right[t, node]))
        return self.baseline + self.value[t, node].sum(axis=0)

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "depth": self.depth,
                **{f: getattr(self, f).tolist() for f in _FIELDS}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Trees":
        types = {"feature": np.int64, "left": np.int64, "right": np.int64, "leaf": bool, "missing_left": bool}
        return cls(float(d["baseline"]), depth=int(d["depth"]),
                   **{f: np.asarray(d[f], types.get(f, np.float64)) for f in _FIELDS})
