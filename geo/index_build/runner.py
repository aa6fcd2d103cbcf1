"""Runs the build stages in order on one bundle; each stage can also run alone.

manifest -> embeddings (Parquet shards) -> errors.parquet -> FAISS -> cells + heads
-> location encoder + GPS gallery -> fusion. A stage whose outputs are
registered in the manifest is skipped on a re-run unless ``force`` names it;
the embedding stage resumes shard by shard.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pyarrow as pa

from geo.bundle import Bundle, atomic_write_parquet
from geo.index_build.embed import EmbedConfig, run_embedding_stage, shard_errors, write_shard
from geo.index_build.knn_index import build_knn_index
from geo.index_build.manifest import read_manifest

ERRORS_FILE = "errors.parquet"
# Below this many photos, cell heads, a location encoder and fusion weights would be fitted to noise;
# such bundles answer by kNN alone and say so.
MIN_TRAINED_PHOTOS = 50


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
    ram_budget: str = "8GB"
    exact_max: int = 100_000
    stages: tuple[str, ...] = ("embeddings", "knn_index", "cells", "gallery", "fusion")
    force: tuple[str, ...] = ()
    stage_options: dict[str, Any] = field(default_factory=dict)


def write_errors(bundle: Bundle, manifest_errors: list[dict]) -> int:
    """All failures in one table (path, stage, reason): what a user fixes before a rebuild."""
    rows = [{"path": str(e.get("path", "")), "stage": e.get("stage", ""), "reason": e.get("reason", "")}
            for e in [*manifest_errors, *shard_errors(bundle)]]
    table = pa.Table.from_pandas(pd.DataFrame(rows, columns=["path", "stage", "reason"]), preserve_index=False)
    atomic_write_parquet(bundle.path(ERRORS_FILE), table)
    bundle.register("errors", [ERRORS_FILE])
    return len(rows)


def build_index(cfg: BuildConfig, log: Callable[[str], None] = print, progress: bool = True) -> Bundle:
    from geo.backbones import load_backbone

    man = read_manifest(cfg.manifest, cfg.image_root)
    log(f"manifest: {len(man.df):,} usable rows, {len(man.errors):,} rejected ({man.source})")
    backbone = load_backbone(cfg.backbone, device=cfg.device, precision=cfg.precision, weights=cfg.weights)
    log(f"backbone: {backbone.name} ({backbone.dim}-d) on {backbone.device}")
    bundle = Bundle.create_or_resume(cfg.out, backbone.spec(), backbone.dim)

    def wanted(stage: str) -> bool:
        return stage in cfg.stages and (stage in cfg.force or not bundle.has_stage(stage))

    if "embeddings" in cfg.stages:  # always run: it resumes shard by shard and is a no-op when complete
        info = run_embedding_stage(bundle, man.df, backbone, cfg.embed, progress=progress)
        failed = write_errors(bundle, man.errors)
        bundle.manifest["counts"] = {"manifest_rows": len(man.df) + len(man.errors), "ok": info["ok"], "failed": failed}
        bundle.save()
        log(f"embeddings: {info['ok']:,} ok, {failed:,} failed (see {Path(cfg.out) / ERRORS_FILE})")
    if wanted("knn_index"):
        build_knn_index(bundle, cfg.ram_budget, cfg.exact_max, log=log)
    trained = [s for s in ("cells", "gallery") if wanted(s)]
    n_photos = int(bundle.manifest.get("counts", {}).get("ok", 0))
    if n_photos < MIN_TRAINED_PHOTOS and (trained or wanted("fusion")):
        log(f"cells, gallery, fusion: skipped, {n_photos} photos is below {MIN_TRAINED_PHOTOS}; answers use kNN")
        return bundle
    if trained:
        meta, emb = bundle.read_embeddings()
        _fit_stages(bundle, meta, emb, "cells" in trained, "gallery" in trained, cfg.stage_options, log)
    if wanted("fusion") or (trained and "fusion" in cfg.stages):  # retune whenever a signal changed
        from geo.retrieval.fusion import tune_fusion_stage

        tune_fusion_stage(bundle, stage_options=cfg.stage_options, log=log, **cfg.stage_options.get("fusion", {}))
    return bundle


def build_from_embeddings(root: str | Path, backbone: dict[str, Any], meta: pd.DataFrame, emb,
                          cells: bool = True, gallery: bool = True, stage_options: dict[str, Any] | None = None,
                          log: Callable[[str], None] = lambda *_: None) -> Bundle:
    """A bundle from embeddings already in hand: one shard, the kNN index, and optionally cells and gallery.

    Fusion tuning and the benchmarks fit stages on subsets of a gallery
    (photographer folds) without re-embedding; this is the one way they do it.
    """
    meta = meta.reset_index(drop=True)
    bundle = Bundle.create_or_resume(root, backbone, emb.shape[1])
    shard = write_shard(bundle, 0, meta, emb, {"failed": 0, "seconds": 0.0, "errors": []})
    bundle.register("embeddings", [shard, shard.with_suffix(".json")], {"ok": len(meta), "failed": 0})
    bundle.manifest["counts"] = {"ok": len(meta), "failed": 0}
    build_knn_index(bundle, log=log)
    _fit_stages(bundle, meta, emb, cells, gallery, stage_options or {}, log)
    return bundle


def _fit_stages(bundle: Bundle, meta: pd.DataFrame, emb, cells: bool, gallery: bool, options: dict[str, Any],
                log: Callable[[str], None]) -> None:
    """The trained stages, on embeddings already read."""
    if cells:
        from geo.cells.stage import CellsConfig, build_cells_stage

        build_cells_stage(bundle, meta, emb, CellsConfig(**options.get("cells", {})), log=log)
    if gallery:
        from geo.gallery.stage import GalleryConfig, build_gallery_stage

        build_gallery_stage(bundle, meta, emb, GalleryConfig(**options.get("gallery", {})), log=log)
