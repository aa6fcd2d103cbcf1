"""The cells stage's artifact: cell tables, heads, calibration and support spots, ready to score embeddings.

Files (written by :meth:`CellPredictor.save`, read by :meth:`CellPredictor.load`)::

    cells/<partition>.parquet    class_label, token, level, count, lat, lon (Class2GPS mean), parent_<coarser>
    cells/support.parquet        photo spots (~1 km) per fine cell: cell, lat, lon, count
    heads/heads.safetensors      the heads' weights
    heads/heads.json             model spec, partitions, calibration, scene values
    heads/regression.safetensors the coordinate regression (:mod:`geo.stages.cells.regression`)
    heads/cities.*               the city head (:mod:`geo.stages.cells.cities`), when the gallery has cities

The fine-cell posterior (:meth:`CellPredictor.fine_probs`) answers "which
cell"; :meth:`CellPredictor.decide` answers "which point is most likely within
r km" over the cells' photo spots (:mod:`geo.stages.cells.support`), which
with a flat posterior is the population prior's answer.
"""
from __future__ import annotations

import copy
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from geo.core.s2 import cell_ring
from geo.core.tables import Columns, columns_of, positions, read_columns
from geo.models.heads import CellHeads, head_logits, load_heads, save_heads
from geo.stages.cells.calibration import (
    fine_log_posterior,
    log_priors,
    partition_log_probs,
)
from geo.stages.cells.cities import CityHead
from geo.stages.cells.region import REGION_MAP, RegionCells
from geo.stages.cells.regression import Regression
from geo.stages.cells.support import DECISION_RADII_KM, SupportDecision, check_support
from geo.store.atomic import atomic_write_parquet
from geo.store.bundle import Bundle, BundleError
from geo.store.schema import checked

if TYPE_CHECKING:
    import pandas as pd

STAGE = "cells"
SUPPORT_FILE = "cells/support.parquet"
HEADS_WEIGHTS = "heads/heads.safetensors"
HEADS_CONFIG = "heads/heads.json"


class CellPredictor:
    """Heads + cell tables, ready to turn embeddings into cell posteriors; ``info`` is the stage's manifest record.

    The tables and support spots (DataFrames from a fit, numpy columns from :meth:`load`) are kept as numpy
    columns (``columns``, ``spots``: what answers read, so a query never imports pandas); ``tables`` and
    ``support`` give them as DataFrames, made on first use, for the build's and ``geo add``'s work."""

    def __init__(self, tables: list[Any], names: list[str], model: CellHeads, calibration: dict,
                 scene_values: list, support: Any, info: dict[str, Any] | None = None,
                 scene_column: str | None = None, regression: Regression | None = None,
                 city_head: CityHead | None = None):
        self.columns: list[Columns] = [columns_of(t) for t in tables]
        self.spots: Columns = columns_of(support)
        self.names, self.model = names, model
        self.regression = regression  # the coordinate regression (--mode regression); None in older bundles
        self.city_head = city_head  # None when the gallery has fewer than two cities with enough photos
        self.calibration = calibration
        self.scene_values = scene_values
        self.info = info or {}
        self.scene_column = scene_column
        fine = self.columns[-1]
        self.priors = log_priors([t["count"].astype(float) for t in self.columns])
        self.parents = [_parent_rows(fine, t, n) for t, n in zip(self.columns[:-1], names[:-1])]
        self._decision = SupportDecision(self.spots, fine["lat"].astype(float), fine["lon"].astype(float))
        self._keep: np.ndarray | None = None  # fine cells a query-time constraint keeps (see within)

    @cached_property
    def tables(self) -> list[pd.DataFrame]:
        """The cell tables as DataFrames, coarse to fine (made on first use: answers read :attr:`columns`)."""
        import pandas as pd

        return [pd.DataFrame(t) for t in self.columns]

    @cached_property
    def support(self) -> pd.DataFrame:
        """The support spots as a DataFrame (made on first use: answers read :attr:`spots`)."""
        import pandas as pd

        return pd.DataFrame(self.spots)

    def save(self, bundle: Bundle) -> tuple[list[str], dict[str, Any]]:
        """Write the tables, support spots and heads; returns (files, info) for the pipeline to commit."""
        files = [SUPPORT_FILE, *(f"cells/{n}.parquet" for n in self.names), HEADS_WEIGHTS, HEADS_CONFIG]
        atomic_write_parquet(bundle.path(SUPPORT_FILE), pa.Table.from_pandas(self.support, preserve_index=False))
        for name, table in zip(self.names, self.tables):
            atomic_write_parquet(bundle.path(f"cells/{name}.parquet"), pa.Table.from_pandas(table, preserve_index=False))
        for stale in bundle.path("cells").glob("*.parquet"):
            if stale.relative_to(bundle.root).as_posix() not in files:
                stale.unlink()  # a partition of an earlier build with other names
        save_heads(self.model, bundle.path(HEADS_WEIGHTS), bundle.path(HEADS_CONFIG),
                   {"partitions": self.names, "calibration": self.calibration, "scene_values": self.scene_values,
                    "scene_column": self.scene_column})
        if self.regression is not None:
            files.append(self.regression.save(bundle))
        if self.city_head is not None:
            files += self.city_head.save(bundle)
        return files, self.info

    @classmethod
    def load(cls, bundle: Bundle, device: str = "cpu") -> "CellPredictor":
        info = bundle.stage(STAGE)
        try:
            names = list(info["partitions"])
        except KeyError:
            raise BundleError(f"{bundle.root}/manifest.json: cells stage lists no partitions") from None
        tables = [_read_table(bundle.path(f"cells/{n}.parquet"), "cell table") for n in names]
        support_path = bundle.path(SUPPORT_FILE)
        if not support_path.exists():
            raise BundleError(f"{support_path}: missing; the bundle predates support spots, rebuild its cells with "
                              "`geo build-index ... --force cells`")
        support = _read_table(support_path, "support spots")
        try:
            check_support(support, len(tables[-1]["token"]), str(support_path))
        except ValueError as e:
            raise BundleError(str(e)) from None
        model, cfg = load_heads(bundle.path(HEADS_WEIGHTS), bundle.path(HEADS_CONFIG), device)
        checked(cfg, {"calibration": {"temperature": (float, list), "alpha": float, "region?": REGION_MAP},
                      "scene_values?": list,
                      "scene_column?": (str, type(None))}, bundle.path(HEADS_CONFIG))
        if [len(t["token"]) for t in tables] != model.spec["n_classes"]:
            raise BundleError(f"{bundle.path(HEADS_CONFIG)}: head sizes do not match the cell tables")
        regression = Regression.load(bundle, info["regression"]) if "regression" in info else None
        city = CityHead.load(bundle, info["city_head"]) if info.get("city_head") else None
        return cls(tables, names, model, cfg["calibration"], cfg.get("scene_values", []), support, info,
                   cfg.get("scene_column"), regression, city)

    def scene_codes(self, scene) -> np.ndarray | None:
        """Scene labels (as in the manifest column) -> head indices, -1 unknown."""
        if scene is None or not self.scene_values:
            return None
        lookup = {str(v): i for i, v in enumerate(self.scene_values)}
        return np.array([lookup.get(str(v), -1) for v in np.asarray(scene).ravel()], dtype=np.int64)

    def log_probs(self, emb: np.ndarray, scene=None, hierarchy: bool = True) -> tuple[list[np.ndarray], np.ndarray]:
        """(per-partition log probs, fine log probs) for a batch; ``hierarchy=False`` gives finest-only."""
        logits = self._logits(emb, scene)
        c = self.calibration
        return partition_log_probs(logits, self.priors, c["temperature"], c["alpha"]), self._fine_log(logits, hierarchy)

    def fine_probs(self, emb: np.ndarray, scene=None) -> np.ndarray:
        """The hierarchical (f*) posterior over the finest partition, [n, C] (renormalised over the kept cells
        under a constraint: :meth:`within`). Every query needs it, and not the per-partition posteriors."""
        probs = np.exp(self._fine_log(self._logits(emb, scene)))
        if self._keep is None:
            return probs
        probs = np.where(self._keep, probs, 0.0)
        return probs / probs.sum(axis=1, keepdims=True).clip(min=1e-300)

    def _logits(self, emb: np.ndarray, scene) -> list[np.ndarray]:
        return head_logits(self.model, np.asarray(emb, dtype=np.float32), self.scene_codes(scene))[0]

    def _fine_log(self, logits: list[np.ndarray], hierarchy: bool = True) -> np.ndarray:
        c = self.calibration
        return fine_log_posterior(logits, self.priors, c["temperature"], c["alpha"], self.parents, hierarchy)

    def within(self, spots: np.ndarray) -> "CellPredictor":
        """The same heads answering inside a query-time constraint: ``spots`` (a mask over the support spots)
        are the spots inside it; the fine posterior is renormalised over the cells that keep a spot, and
        :meth:`decide` chooses among the kept spots alone."""
        out = copy.copy(self)
        t = self.columns[-1]
        out._keep = np.bincount(self.spots["cell"].astype(np.int64)[spots], minlength=len(t["lat"])) > 0
        out._decision = SupportDecision({k: v[spots] for k, v in self.spots.items()}, t["lat"].astype(float),
                                        t["lon"].astype(float))
        return out

    @cached_property
    def _fine_cells(self) -> tuple[list[str], list[float], list[float], list[int]]:
        """The fine table's token, lat, lon and level as Python lists: an answer's top cells read five rows,
        and five pandas lookups per field cost a warm query more than its country and place together."""
        t = self.columns[-1]
        return (t["token"].astype(str).tolist(), t["lat"].astype(float).tolist(), t["lon"].astype(float).tolist(),
                t["level"].astype(int).tolist())

    def top_cells(self, fine: np.ndarray, k: int = 5) -> list[dict[str, Any]]:
        """The k most probable fine cells of one posterior row, best first, as answers list them."""
        token, lat, lon, level = self._fine_cells
        top = np.argpartition(-fine, min(k, len(fine) - 1))[:k]
        top = top[np.argsort(-fine[top], kind="stable")].tolist()
        return [{"partition": self.names[-1], "token": token[j], "prob": round(float(fine[j]), 5),
                 "lat": lat[j], "lon": lon[j],
                 # semantic cells (level -1) are Voronoi regions clipped to borders: no ring is stored for them
                 "polygon": [list(p) for p in cell_ring(token[j])] if level[j] >= 0 else None} for j in top]

    @cached_property
    def region_cells(self) -> RegionCells:
        """The cells' areas, nesting and shapes, which regions are grown over (made on first use)."""
        return RegionCells(self.columns, self.names)

    def regions(self, fine: np.ndarray, coverage: float) -> list[dict[str, Any]]:
        """Each fine posterior row's region at a stated coverage (``Answer.region``), through the build's
        conformal map (a bundle built before it has none: the posterior mass stands for the coverage, and
        the region says ``calibrated: false``), with its curve at :data:`REPORT_COVERAGES`."""
        return self.region_cells.answers(fine, coverage, self.calibration.get("region"))

    def decide(self, fine_probs: np.ndarray, radii_km=DECISION_RADII_KM) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lat, lon, mass within radii_km[0]) per row of fine probabilities [n, C]: the photo spot with most
        posterior mass within the radii in turn."""
        return self._decision.decide(fine_probs, radii_km)


def _read_table(path, what: str) -> Columns:
    try:
        return read_columns(path)
    except (FileNotFoundError, OSError) as e:
        raise BundleError(f"{path}: cannot read {what} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _parent_rows(fine: Columns, coarse: Columns, coarse_name: str) -> np.ndarray:
    col = f"parent_{coarse_name}"
    if col not in fine:
        raise BundleError(f"fine cell table has no {col} column (cells stage built without hierarchy)")
    pos = positions(coarse["token"], fine[col])
    if (pos < 0).any():
        raise BundleError(f"fine cell table names parents missing from partition {coarse_name!r}")
    return pos
