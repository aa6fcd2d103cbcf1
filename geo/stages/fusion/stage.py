"""The fusion stage: fit fusion's parameters on out-of-fold evidence, in memory.

Every signal of a finished bundle contains the gallery photos themselves
(the kNN index finds a photo's own row, the cells' priors and means and the
gallery's points and density prior include it), so scoring a gallery photo
against it would find its own answer. Instead the gallery's photographers are
split into folds and, for each fold, the signal stages are fitted in memory
on the other folds' rows (an exact kNN index, the cells, the GPS gallery, the
prior) and the fold's photos are scored against them: no query ever sees its
own photographer. Nothing is written to disk, and the cells' calibration is
not cross-fitted again inside a fold (the fold is already photographer-disjoint).

Files: ``fusion/fusion.json`` (params, validation scores, calibration) and, where the reranker beat the
mixture out of fold, ``fusion/rerank.json`` (its trees as arrays and its calibration; no pickle).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from geo.core.geodesy import THRESHOLDS_KM
from geo.core.memory import release_unused
from geo.core.priors import population_prior
from geo.core.progress import bar, inside, showing
from geo.core.splits import group_column, group_folds, validation_mask
from geo.stages.cells.predictor import CellPredictor
from geo.stages.cells.stage import CellsConfig, fit_cells
from geo.stages.cells.stage import with_photos as cells_with_photos
from geo.stages.fusion.posterior import Decision, FusionParams, decide
from geo.stages.fusion.signals import (
    Batch,
    Evidence,
    collect,
    knn_search,
    sources_for,
    specs_for,
)
from geo.stages.fusion.rerank import Reranker, accuracy_km, fit_reranker, fits, rescorer
from geo.stages.fusion.tuning import (
    accuracy,
    calibrate_modes,
    no_worse_than_restrictions,
    tune,
    tune_backed_off_modes,
)
from geo.stages.gallery.stage import GalleryConfig, GpsGallery, fit_gallery
from geo.stages.gallery.stage import with_photos as gallery_with_photos
from geo.stages.knn import KnnIndex
from geo.store.atomic import atomic_write_json
from geo.store.bundle import Bundle
from geo.store.schema import checked, read_checked

if TYPE_CHECKING:
    import pandas as pd

STAGE = "fusion"
FUSION_FILE = "fusion/fusion.json"
RERANK_FILE = "fusion/rerank.json"


@dataclass
class FusionConfig:
    group_column: str | None = None  # photographers; default AUTHOR, owner, ... when present
    folds: int = 3
    seed: int = 0
    k: int = 50  # neighbours per query, as `geo query` retrieves by default
    max_queries: int = 2000  # scored photos per fold (a seeded sample beyond); the mixture's grid is tuned on these
    # Large galleries: held-out photos scored for the reranker (the mixture is tuned on max_queries of them).
    # Out of fold at 150K its gain over the mixture was +0.9 +- 0.5 share points on 2,000 photos (backed off),
    # +0.8 +- 0.3 on 4,000 and +1.0 +- 0.3 on 8,000: a ranker of ~60 features needs more photos than a grid
    # of ten weights (benchmarks/RESULTS.md, issue 24).
    rerank_queries: int = 6000
    # Up to this many photos, fusion refits the signal stages in memory on photographer folds (fit_fusion);
    # above, it scores about max_queries photos of the held-out photographers against the built stages
    # without them (fit_fusion_on_built), so tuning costs no stage fit at all however large the gallery
    # (and a few thousand queries fit ten parameters well).
    single_split_above: int = 10_000


@dataclass
class FusionModel:
    """The stage's artifact: the fitted parameters, what the out-of-fold evidence said about every mode, and
    the reranker where it beat the mixture out of fold (None otherwise, and in bundles from before it)."""

    params: FusionParams
    report: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    reranker: Reranker | None = None

    def save(self, bundle: Bundle) -> tuple[list[str], dict[str, Any]]:
        atomic_write_json(bundle.path(FUSION_FILE), {"params": self.params.to_dict(), **self.config, **self.report})
        files = [FUSION_FILE]
        if self.reranker is not None:
            atomic_write_json(bundle.path(RERANK_FILE), self.reranker.to_dict())
            files.append(RERANK_FILE)
        return files, {"params": self.params.to_dict(), "validation": self.report.get("validation"),
                       "single_modes": self.report.get("single_modes"), "ece": self.report.get("ece"),
                       "mode_ece": self.report.get("mode_ece")}

    @classmethod
    def load(cls, bundle: Bundle) -> "FusionModel":
        """The committed artifact; a reranker only where this fusion committed one (a file left over from an
        earlier build is not in the manifest's files and is ignored)."""
        info = bundle.stage(STAGE)
        stored = read_checked(bundle.path(FUSION_FILE), {"params": dict}) if bundle.path(FUSION_FILE).exists() else {}
        if stored:
            checked_params(stored["params"], bundle.path(FUSION_FILE), "params")
        params = checked_params(info.get("params"), bundle.root, "stages.fusion.params")
        reranker = (Reranker.from_dict(read_checked(bundle.path(RERANK_FILE), RERANK_SCHEMA))
                    if RERANK_FILE in bundle.manifest.get("files", {}) else None)
        return cls(params, {k: v for k, v in stored.items() if k != "params"}, reranker=reranker)

    def decide(self, ev: Evidence) -> list[Decision]:
        """The fused mode's answers: the reranker's where it has one (fitted on these signals), the mixture's
        otherwise."""
        use = self.reranker is not None and fits(self.reranker, ev)
        return decide(ev, self.params, rerank=rescorer(self.reranker) if use else None)


# rerank.json as load reads it; its trees are arrays of Trees' fields (region_km: absent before the rule was chosen;
# backoff_below: absent where the ranker never backs off to the constant guess, and in files from before)
RERANK_SCHEMA = {"trees": dict, "features": [str], "calibration?": dict, "summary?": dict, "region_km?": float,
                 "backoff_below?": float}
_SIGNAL_SCHEMA = {"weight": float, "temperature?": float, "top_k?": int}
PARAMS_SCHEMA = {"signals": {"*": _SIGNAL_SCHEMA}, "duplicate_similarity?": float, "decision?": str,
                 "calibration?": dict, "mode_calibration?": dict, "mode_fusion?": dict, "rerank?": dict}
# params as bundles wrote them before signals had names (FusionParams.from_dict reads both)
_UNNAMED_PARAMS_SCHEMA = {**{k: float for k in ("w_knn", "w_gallery", "w_cells", "w_prior", "knn_temperature",
                                                "gallery_temperature")}, "gallery_k": int, "top_cells": int,
                          "duplicate_similarity?": float, "decision?": str, "calibration?": dict}


def checked_params(params: Any, where: Any, field: str) -> FusionParams:
    """Stored fusion params, refused (naming ``where`` and the field) unless they have the shape fusion reads."""
    unnamed = isinstance(params, dict) and "signals" not in params and "w_knn" in params
    checked(params, _UNNAMED_PARAMS_SCHEMA if unnamed else PARAMS_SCHEMA, where, field)
    return FusionParams.from_dict(params)


@dataclass
class SignalStages:
    """What fusion mixes: which signal stages to fit for the out-of-fold evidence, with their configs."""

    cells: CellsConfig | None
    gallery: GalleryConfig | None
    backbone: str = ""


def fit_fusion(meta: pd.DataFrame, emb: np.ndarray, stages: SignalStages, config: FusionConfig = FusionConfig(),
               log: Callable[[str], None] = print) -> FusionModel:
    """Fit fusion on out-of-fold evidence for the gallery's own photos.

    Folds hold out whole photographers (the group column), so the weights are
    fitted to how the signals do on people the index has not seen.
    """
    col = group_column(meta.columns, config.group_column)
    groups = meta[col].astype(str).to_numpy() if col else None
    n_groups = len(np.unique(groups)) if groups is not None else len(meta)
    saved = {"group_column": col, "folds": config.folds, "seed": config.seed, "how": "photographer folds, refitted"}
    if len(meta) < 20 or n_groups < config.folds:
        log(f"fusion: {len(meta)} photos in {n_groups} groups are too few to tune; default weights, no calibration")
        specs = specs_for(stages.cells is not None, stages.gallery is not None)
        return FusionModel(FusionParams.default(specs), {"validation": None}, saved)
    t0 = time.perf_counter()
    rows, ev, singles = out_of_fold(meta, emb, splits(len(meta), groups, config), stages, config, log)
    truth = meta[["lat", "lon"]].to_numpy(np.float64)[rows]
    return _tuned(ev, singles, truth, groups[rows] if groups is not None else None, saved,
                  time.perf_counter() - t0, log)


def splits(n: int, groups: np.ndarray | None, config: FusionConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """(scored rows, fitting rows) per fold, whole photographers on one side: ``folds`` folds, each scored
    against the others (at most ``max_queries`` of its photos, a seeded sample)."""
    rng = np.random.default_rng(config.seed)
    fold = group_folds(n, groups, config.folds, config.seed)
    out = []
    for f in np.unique(fold):
        held = np.flatnonzero(fold == f)
        if len(held) > config.max_queries:
            held = np.sort(rng.choice(held, config.max_queries, replace=False))
        out.append((held, np.flatnonzero(fold != f)))
    return out


def out_of_fold(meta: pd.DataFrame, emb: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]],
                stages: SignalStages, config: FusionConfig,
                log: Callable[[str], None] = print) -> tuple[np.ndarray, Evidence, dict[str, np.ndarray]]:
    """Every signal for photos it has not seen; returns (queried rows, their evidence, single-mode answers [n, 2])."""
    meta = meta.reset_index(drop=True)
    all_rows, parts, singles = [], [], {"knn": [], "gallery": [], "cells": [], "prior": []}
    quiet = lambda *_: None  # noqa: E731  the folds' own logs would repeat the real stages'
    steps = 2 + (stages.cells is not None) + (stages.gallery is not None)  # knn, [cells], [gallery], scoring
    log(f"fusion: {len(folds)} photographer folds, each fitting every signal again on the others' photos")
    progress = bar(len(folds) * steps, "fusion folds", unit="step")
    now = {"label": ""}
    for f, (held, train) in enumerate(folds):
        def step(what: str) -> None:
            now["label"] = f"fold {f + 1}/{len(folds)}: {what} ({len(train)} fit, {len(held)} scored)"
            progress.set_postfix_str(now["label"])

        step("kNN")
        tmeta, temb = meta.iloc[train].reset_index(drop=True), emb[train]
        knn = KnnIndex.from_arrays(temb, tmeta)
        progress.update()
        cells: CellPredictor | None = None
        with showing(True, False), inside(progress, lambda: now["label"]):  # the folds' epochs count in its label
            if stages.cells is not None:
                step("cell heads")
                cells = fit_cells(tmeta, temb, dataclasses.replace(stages.cells, crossfit=False, answer_heads=False), log=quiet)
                progress.update()
            gallery: GpsGallery | None = None
            if stages.gallery is not None:
                step("GPS gallery")
                gallery = fit_gallery(tmeta, temb, stages.gallery, stages.backbone, log=quiet)
                progress.update()
        step("scoring")
        lat, lon = tmeta["lat"].to_numpy(np.float64), tmeta["lon"].to_numpy(np.float64)
        ev, fold_singles = score(Batch(emb[held], config.k), knn, cells, gallery, lat, lon)
        progress.update()
        for m, v in fold_singles.items():
            singles[m].append(v)
        all_rows.append(held)
        parts.append(ev)
    progress.close()
    return np.concatenate(all_rows), Evidence.concat(parts), {m: np.concatenate(v) for m, v in singles.items() if v}


def score(batch: Batch, knn: KnnIndex, cells: CellPredictor | None, gallery: GpsGallery | None,
          lat: np.ndarray, lon: np.ndarray) -> tuple[Evidence, dict[str, np.ndarray]]:
    """Every signal's evidence for these photos, and the prior mode's answer [n, 2]. The other single modes'
    answers, what fusion must beat, are each signal with the prior tuned like the fused mode (what those
    modes answer at query time), from :func:`tune_backed_off_modes`."""
    ev = collect(sources_for(knn, cells, gallery, lat, lon), batch)
    return ev, {"prior": np.broadcast_to(population_prior(lat, lon), (len(batch), 2))}


def holdout_rows(held: np.ndarray, groups: np.ndarray | None, max_queries: int, seed: int) -> np.ndarray:
    """Fusion's queries in a large gallery: whole photographers, about ``max_queries`` photos, all drawn from
    ``held`` (the photographers every trained stage held out), so no trained part has seen them."""
    rows = np.flatnonzero(held)
    if len(rows) <= max_queries:
        return rows
    sub = validation_mask(len(rows), groups[rows] if groups is not None else None, max_queries / len(rows), seed + 1)
    return rows[sub]


def fit_fusion_on_built(meta: pd.DataFrame, held: np.ndarray, query_emb: Callable[[np.ndarray], np.ndarray],
                        knn: Callable[[], KnnIndex], cells: Callable[[], CellPredictor] | None,
                        gallery: Callable[[], GpsGallery] | None, config: FusionConfig = FusionConfig(),
                        log: Callable[[str], None] = print) -> FusionModel:
    """Fusion for a large gallery, from its built stages: no stage is fitted again.

    ``meta`` holds every gallery photo's metadata (no embeddings); ``held`` marks
    the photographers the heads and the location encoder held out. A few
    thousand of their photos (whole photographers) are scored against the built
    kNN index searched without those photographers' rows, the cells' tables and
    the GPS gallery's points and prior recomputed without them, and the prior of
    the rest: exactly what a gallery without them would answer, since no trained
    part learnt from them (they only chose when to stop training and the heads'
    temperature). ``query_emb(rows)`` reads those photos' embeddings; ``knn``, ``cells``
    and ``gallery`` load the built stages, one after another: the kNN index (about
    the embeddings' size) is searched and released before the gallery is re-encoded.
    The cost is one gallery re-encode and a few thousand queries, whatever the gallery's size.
    """
    col = group_column(meta.columns, config.group_column)
    groups = meta[col].astype(str).to_numpy() if col else None
    rows = holdout_rows(held, groups, max(config.rerank_queries, config.max_queries), config.seed)
    scored = np.zeros(len(meta), bool)
    scored[rows] = True  # the grid's photos: about max_queries of these, whole photographers (positions in rows)
    tune_rows = np.flatnonzero(np.isin(rows, holdout_rows(scored, groups, config.max_queries, config.seed)))
    saved = {"group_column": col, "folds": 1, "seed": config.seed, "how": "built stages, held-out photographers"}
    if len(rows) < 20:
        log(f"fusion: {len(rows)} held-out photos are too few to tune; default weights, no calibration")
        return FusionModel(FusionParams.default(specs_for(cells is not None, gallery is not None)),
                           {"validation": None}, saved)
    t0 = time.perf_counter()
    rest = np.ones(len(meta), bool)
    rest[rows] = False
    lat, lon = meta["lat"].to_numpy(np.float64), meta["lon"].to_numpy(np.float64)
    log(f"fusion: scoring {len(rows):,} photos of held-out photographers against the built stages without them")
    batch = Batch(query_emb(rows), config.k)
    index = knn().excluding(rows)
    knn_search(index, batch)  # the one search, memoised in the batch
    index.release()
    built_cells = cells_with_photos(cells(), lat[rest], lon[rest]) if cells is not None else None
    built_gallery = (gallery_with_photos(gallery(), np.stack([lat[rest], lon[rest]], -1))
                     if gallery is not None else None)
    ev, singles = score(batch, index, built_cells, built_gallery, lat[rest], lon[rest])
    # the stages (the gallery's index alone is ~0.5 GB at 150K) and the batch's memos (its cell posterior is
    # [photos, fine cells]) are not needed by the tuning, whose grid is fusion's own peak
    del batch, index, built_cells, built_gallery
    release_unused()
    t1 = time.perf_counter()
    return _tuned(ev, singles, np.stack([lat[rows], lon[rows]], -1),
                  groups[rows] if groups is not None else None, saved, t1 - t0, log, tune_rows)


def _tuned(ev: Evidence, singles: dict[str, np.ndarray], truth: np.ndarray, groups: np.ndarray | None,
           saved: dict[str, Any], signal_seconds: float, log: Callable[[str], None],
           tune_rows: np.ndarray | None = None) -> FusionModel:
    """The mixture tuned on ``tune_rows`` of the scored photos (default all), the reranker fitted on all of
    them; every mode's validation reported on the same ``tune_rows``."""
    t1 = time.perf_counter()
    sub = np.arange(len(ev)) if tune_rows is None else np.asarray(tune_rows)
    tev, ttruth, tgroups = ev.take(sub), truth[sub], groups[sub] if groups is not None else None
    singles = {m: v[sub] for m, v in singles.items()}
    params, report = tune(tev, ttruth, tgroups, log=log)
    params.mode_fusion, report["backed_off_modes"] = tune_backed_off_modes(tev, ttruth, tgroups, singles)
    params, chosen = no_worse_than_restrictions(tev, params, ttruth, log)
    report.update(chosen)
    params.mode_calibration, report["mode_ece"] = calibrate_modes(tev, params, singles, ttruth)
    reranker, report["rerank"], answer_km = fit_reranker(ev, params, truth, groups, log)
    params.rerank = report["rerank"]
    if reranker is not None:
        report["mixture_validation"], report["validation"] = report["validation"], accuracy_km(answer_km[sub])
    report["seconds"] = {"out_of_fold_signals": round(signal_seconds, 2), "tuning": round(time.perf_counter() - t1, 2)}
    report["single_modes"] = {m: accuracy(p, ttruth) for m, p in singles.items()}
    report["n_validation"], report["n_reranker"] = int(len(sub)), int(len(ev))
    for m, a in {**report["single_modes"], "fused": report["validation"]}.items():
        log(f"fusion out-of-fold {m:>8}: " + " ".join(f"{t}km {100 * a[t]:.1f}%" for t in map(str, THRESHOLDS_KM))
            + f"  median {a['median_km']:.0f} km")
    return FusionModel(params, report, saved, reranker)
