"""The build: the stages in order on one bundle, each fitted, saved and committed in turn.

manifest -> embeddings (Parquet shards) -> errors.parquet -> kNN (FAISS) -> cells + heads
-> location encoder + GPS gallery -> fusion.

Each stage is a typed config, a ``fit`` that returns an artifact in memory and
the artifact's ``save``; this module is the only one that commits a stage's
files to ``manifest.json`` (:meth:`geo.store.bundle.Bundle.commit`). A stage
whose record is in the manifest is skipped on a re-run unless ``force`` names
it; the embedding stage resumes shard by shard.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pyarrow as pa

from geo.data.manifest import read_manifest
from geo.models.backbones import load_backbone
from geo.stages.cells.stage import CellsConfig, fit_cells
from geo.stages.embed import EmbedConfig, run_embedding_stage
from geo.stages.fusion.stage import FusionConfig, SignalStages, fit_fusion
from geo.stages.gallery.stage import GalleryConfig, fit_gallery
from geo.stages.knn import KnnConfig, fit_knn
from geo.store.atomic import atomic_write_parquet
from geo.store.bundle import Bundle
from geo.store.embeddings import EmbeddingReader, marker_path, shard_errors, write_shard

ERRORS_FILE = "errors.parquet"
# Below this many photos, cell heads, a location encoder and fusion weights would be fitted to noise;
# such bundles answer by kNN alone and say so.
MIN_TRAINED_PHOTOS = 50
STAGES = ("embeddings", "knn_index", "cells", "gallery", "fusion")
# The folders each stage owns: a re-run stage replaces every file it had recorded there.
STAGE_FOLDERS = {"embeddings": ("embeddings/",), "knn_index": ("index/",), "cells": ("cells/", "heads/"),
                 "gallery": ("gallery/",), "fusion": ("fusion/",)}

Log = Callable[[str], None]


@dataclass
class StageConfigs:
    """Every fitted stage's options; ``group_column`` (photographers) is the one split all of them hold out."""

    knn: KnnConfig = field(default_factory=KnnConfig)
    cells: CellsConfig = field(default_factory=CellsConfig)
    gallery: GalleryConfig = field(default_factory=GalleryConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    group_column: str | None = None

    def resolved(self) -> "StageConfigs":
        """The configs with the shared group column (when given) set in each stage that splits by it."""
        if self.group_column is None:
            return self
        g = self.group_column
        return dataclasses.replace(self, cells=dataclasses.replace(self.cells, group_column=g),
                                   gallery=dataclasses.replace(self.gallery, group_column=g),
                                   fusion=dataclasses.replace(self.fusion, group_column=g))


@dataclass
class BuildConfig:
    manifest: str
    out: str
    image_root: str | None = None
    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    device: str = "auto"
    precision: str = "auto"
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    stage_configs: StageConfigs = field(default_factory=StageConfigs)
    stages: tuple[str, ...] = STAGES
    force: tuple[str, ...] = ()


def write_errors(bundle: Bundle, manifest_errors: list[dict]) -> int:
    """All failures in one table (path, stage, reason): what a user fixes before a rebuild."""
    rows = [{"path": str(e.get("path", "")), "stage": e.get("stage", ""), "reason": e.get("reason", "")}
            for e in [*manifest_errors, *shard_errors(bundle)]]
    table = pa.Table.from_pandas(pd.DataFrame(rows, columns=["path", "stage", "reason"]), preserve_index=False)
    atomic_write_parquet(bundle.path(ERRORS_FILE), table)
    bundle.commit("errors", [ERRORS_FILE])
    return len(rows)


def build_index(cfg: BuildConfig, log: Log = print, progress: bool = True) -> Bundle:
    """Embed the manifest's photos (resumably), then fit and commit every wanted stage."""
    man = read_manifest(cfg.manifest, cfg.image_root)
    log(f"manifest: {len(man.df):,} usable rows, {len(man.errors):,} rejected ({man.source})")
    backbone = load_backbone(cfg.backbone, device=cfg.device, precision=cfg.precision, weights=cfg.weights)
    log(f"backbone: {backbone.name} ({backbone.dim}-d) on {backbone.device}")
    bundle = Bundle.create_or_resume(cfg.out, backbone.spec(), backbone.dim)
    if "embeddings" in cfg.stages:  # always run: it resumes shard by shard and is a no-op when complete
        t0 = time.perf_counter()
        files, info = run_embedding_stage(bundle, man.df, backbone, cfg.embed, progress=progress)
        bundle.commit("embeddings", files, {**info, "stage_seconds": round(time.perf_counter() - t0, 2)},
                      replace=STAGE_FOLDERS["embeddings"])
        failed = write_errors(bundle, man.errors)
        bundle.manifest["counts"] = {"manifest_rows": len(man.df) + len(man.errors), "ok": info["ok"], "failed": failed}
        bundle.save()
        log(f"embeddings: {info['ok']:,} ok, {failed:,} failed (see {Path(cfg.out) / ERRORS_FILE})")
    run_stages(bundle, cfg.stage_configs, cfg.stages, cfg.force, log)
    return bundle


def build_from_embeddings(root: str | Path, backbone: dict[str, Any], meta: pd.DataFrame, emb,
                          configs: StageConfigs = StageConfigs(), stages: tuple[str, ...] = STAGES,
                          log: Log = lambda *_: None) -> Bundle:
    """A bundle from embeddings already in hand (one shard), then the same stages as :func:`build_index`.

    The benchmarks fit bundles on subsets of a gallery (photographer folds)
    without re-embedding; this is the one way they do it.
    """
    meta = meta.reset_index(drop=True)
    bundle = Bundle.create_or_resume(root, backbone, emb.shape[1])
    shard = write_shard(bundle, 0, meta, emb, {"failed": 0, "seconds": 0.0, "errors": []})
    bundle.commit("embeddings", [shard, marker_path(shard)], {"shards": 1, "ok": len(meta), "failed": 0},
                  replace=STAGE_FOLDERS["embeddings"])
    bundle.manifest["counts"] = {"ok": len(meta), "failed": 0}
    bundle.save()
    run_stages(bundle, configs, stages, (), log)
    return bundle


def run_stages(bundle: Bundle, configs: StageConfigs, stages: tuple[str, ...] = STAGES, force: tuple[str, ...] = (),
               log: Log = print) -> None:
    """Fit, save and commit the stages after the embeddings that ``stages`` names and the bundle lacks (or ``force``)."""
    configs = configs.resolved()

    def wanted(stage: str) -> bool:
        return stage in stages and (stage in force or not bundle.has_stage(stage))

    def commit(stage: str, artifact: Any, t0: float) -> None:
        files, info = artifact.save(bundle)
        bundle.commit(stage, files, {**info, "stage_seconds": round(time.perf_counter() - t0, 2)},
                      replace=STAGE_FOLDERS[stage])

    reader = EmbeddingReader(bundle)
    if wanted("knn_index"):
        t0 = time.perf_counter()
        commit("knn_index", fit_knn(reader, configs.knn, log=log), t0)
    trained = [s for s in ("cells", "gallery") if wanted(s)]
    retune = wanted("fusion") or (bool(trained) and "fusion" in stages)  # retune whenever a signal changed
    if not trained and not retune:
        return
    n_photos = reader.count
    if n_photos < MIN_TRAINED_PHOTOS:
        log(f"cells, gallery, fusion: skipped, {n_photos} photos is below {MIN_TRAINED_PHOTOS}; answers use kNN")
        return
    meta, emb = reader.read()
    backbone = str(bundle.manifest.get("backbone", {}).get("name", ""))
    if "cells" in trained:
        t0 = time.perf_counter()
        commit("cells", fit_cells(meta, emb, configs.cells, log=log), t0)
    if "gallery" in trained:
        t0 = time.perf_counter()
        commit("gallery", fit_gallery(meta, emb, configs.gallery, backbone, log=log), t0)
    if retune:
        t0 = time.perf_counter()
        signal_stages = SignalStages(configs.cells if bundle.has_stage("cells") else None,
                                     configs.gallery if bundle.has_stage("gallery") else None, backbone)
        commit("fusion", fit_fusion(meta, emb, signal_stages, configs.fusion, log=log), t0)

