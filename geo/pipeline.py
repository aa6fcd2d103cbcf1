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
import datetime as _dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from geo.cluster import connect, embed_on_ray, ray_map
from geo.core.runtime import matmul_flops
from geo.core.sizes import human_bytes
from geo.core.splits import group_column, training_rows, validation_mask
from geo.data.embedding_table import EmbeddingTable
from geo.data.manifest import ManifestError, ManifestResult, read_manifest
from geo.models.backbones import BackboneError, backbone_from_spec, load_backbone
from geo.plan import StagePlan, check, default_memory, index_budget, plan_build
from geo.settings import StageConfigs, build_record, from_dict, recorded
from geo.stages.cells.predictor import CellPredictor
from geo.stages.cells.stage import fit_cells
from geo.stages.cells.stage import with_photos as cells_with_photos
from geo.stages.embed import (
    EmbedConfig,
    ingest_embeddings,
    manifest_fingerprint,
    run_embedding_stage,
)
from geo.stages.fusion.stage import SignalStages, fit_fusion, fit_fusion_on_built
from geo.stages.gallery.stage import GpsGallery, fit_gallery
from geo.stages.gallery.stage import with_photos as gallery_with_photos
from geo.stages.knn import KnnIndex, fit_knn, read_index
from geo.store.atomic import atomic_write_parquet, ensure_free_space
from geo.store.bundle import Bundle, BundleError, open_bundle
from geo.store.embeddings import EmbeddingReader, marker_path, shard_errors, write_shard
from geo.store.lock import writing

ERRORS_FILE = "errors.parquet"
# Below this many photos, cell heads, a location encoder and fusion weights would be fitted to noise;
# such bundles answer by kNN alone and say so.
MIN_TRAINED_PHOTOS = 50
# The held-out photographers every trained stage shares (heads, location encoder, large galleries' fusion).
VAL_FRACTION, SPLIT_SEED = 0.2, 0
STAGES = ("embeddings", "knn_index", "cells", "gallery", "fusion")
# The folders each stage owns: a re-run stage replaces every file it had recorded there.
STAGE_FOLDERS = {"embeddings": ("embeddings/",), "knn_index": ("index/",), "cells": ("cells/", "heads/"),
                 "gallery": ("gallery/",), "fusion": ("fusion/",)}

Log = Callable[[str], None]


@dataclass
class BuildConfig:
    """One build. Photos come from ``manifest`` (CSV/Parquet or a folder of EXIF-tagged photos) or, already
    embedded by ``backbone``, from ``embeddings`` (Parquet or clip-retrieval output; see geo.data.embedding_table)."""

    manifest: str | None
    out: str
    embeddings: str | None = None
    embedding_column: str = "embedding"
    image_root: str | None = None
    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    device: str = "auto"
    precision: str = "auto"
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    stage_configs: StageConfigs = field(default_factory=StageConfigs)
    stages: tuple[str, ...] = STAGES
    force: tuple[str, ...] = ()
    memory: int = field(default_factory=default_memory)  # bytes the build may hold at its peak
    # A Ray cluster's address ("local": start one here, or RAY_ADDRESS) for the embedding stage and FAISS
    # population; None: this process only (geo.cluster).
    ray: str | None = None

    def __post_init__(self) -> None:
        """The FAISS index's budget, when not set, is its share of this build's ``memory`` (one memory knob)."""
        if self.stage_configs.knn.ram_budget is None:
            knn = dataclasses.replace(self.stage_configs.knn, ram_budget=index_budget(self.memory))
            self.stage_configs = dataclasses.replace(self.stage_configs, knn=knn)


def write_errors(bundle: Bundle, manifest_errors: list[dict], keep_earlier: bool = False) -> int:
    """All failures in one table (path, stage, reason): what a user fixes before a rebuild.

    Image and embedding failures come from the shards' markers; rejected manifest rows from the caller,
    and with ``keep_earlier`` (``geo add``) also those an earlier build or addition recorded.
    """
    earlier: list[dict] = []
    if keep_earlier and bundle.path(ERRORS_FILE).exists():
        old = pq.read_table(bundle.path(ERRORS_FILE)).to_pandas()
        earlier = old[old["stage"] == "manifest"].to_dict("records")
    rows = [{"path": str(e.get("path", "")), "stage": e.get("stage", ""), "reason": e.get("reason", "")}
            for e in [*earlier, *manifest_errors, *shard_errors(bundle)]]
    table = pa.Table.from_pandas(pd.DataFrame(rows, columns=["path", "stage", "reason"]), preserve_index=False)
    atomic_write_parquet(bundle.path(ERRORS_FILE), table)
    bundle.commit("errors", [ERRORS_FILE])
    return len(rows)


def build_index(cfg: BuildConfig, log: Log = print, progress: bool = True) -> Bundle:
    """Embed the manifest's photos, or read precomputed embeddings (resumably), then fit and commit every stage.

    The bundle's write lock (:func:`geo.store.lock.writing`) is held from before the model loads to the end,
    so a second build of the same ``out`` is refused at once."""
    if (cfg.manifest is None) == (cfg.embeddings is None):
        raise ValueError("give either a manifest (photos) or --embeddings (precomputed), not both or neither")
    if cfg.ray is not None:
        connect(cfg.ray)
        log(f"ray: connected ({cfg.ray}); embedding shards and FAISS population run on the cluster")
    man = None
    if cfg.manifest is not None:
        man = read_manifest(cfg.manifest, cfg.image_root)
        log(f"manifest: {len(man.df):,} usable rows, {len(man.errors):,} rejected ({man.source})")
        if man.df.empty and not Path(cfg.out, "manifest.json").exists():  # before a model load or a bundle
            reasons = "; ".join(f"{Path(e['path']).name}: {e['reason']}" for e in man.errors[:3])
            raise ManifestError(f"{man.source}: nothing to index, {len(man.errors)} inputs rejected"
                                + (f" ({reasons}{', ...' if len(man.errors) > 3 else ''})" if reasons else "")
                                + "; no bundle was written")
    with writing(cfg.out, log):
        return _build(cfg, man, log, progress)


def _build(cfg: BuildConfig, man: ManifestResult | None, log: Log, progress: bool) -> Bundle:
    if man is None:
        spec = backbone_spec(cfg.backbone, cfg.weights, log)
        table = EmbeddingTable(cfg.embeddings, cfg.embedding_column, dim=spec.get("dim"))
        spec.setdefault("dim", table.dim)
        log(f"embeddings: {table.rows:,} rows of {table.dim}-d from {len(table.parts)} file(s) ({cfg.embeddings})")
        plans = plan_stages(cfg, table.rows, table.dim)
        check(plans, cfg.memory)
        bundle = Bundle.create_or_resume(cfg.out, spec, table.dim)
        embed = lambda: ingest_embeddings(bundle, table, cfg.embed, progress=progress)  # noqa: E731
        rejected: list[dict] = []
        total = table.rows
    else:
        backbone = load_backbone(cfg.backbone, device=cfg.device, precision=cfg.precision, weights=cfg.weights)
        log(f"backbone: {backbone.name} ({backbone.dim}-d) on {backbone.device}")
        plans = plan_stages(cfg, len(man.df), backbone.dim)
        check(plans, cfg.memory)
        bundle = Bundle.create_or_resume(cfg.out, backbone.spec(), backbone.dim)
        if cfg.ray is not None:
            embed = lambda: embed_on_ray(bundle, man.df, cfg.embed, cfg.device, cfg.precision,  # noqa: E731
                                         progress=progress)
        else:
            embed = lambda: run_embedding_stage(bundle, man.df, backbone, cfg.embed, progress=progress)  # noqa: E731
        rejected, total = man.errors, len(man.df) + len(man.errors)
    bundle.begin_build(cfg.stages, build_record(cfg.stage_configs, cfg.embed, cfg.stages))
    disk = {p.stage: p.disk for p in plans}
    if "embeddings" in cfg.stages:  # always run: it resumes shard by shard and is a no-op when complete
        written = sum(f.stat().st_size for f in bundle.path("embeddings").glob("*") if f.is_file()) \
            if bundle.path("embeddings").is_dir() else 0
        ensure_free_space(bundle.root, max(disk["embeddings"] - written, 0), "the embeddings stage")
        t0 = time.perf_counter()
        files, info = embed()
        bundle.commit("embeddings", files, {**info, "stage_seconds": round(time.perf_counter() - t0, 2)},
                      replace=STAGE_FOLDERS["embeddings"])
        failed = write_errors(bundle, rejected)
        bundle.manifest["counts"] = {"manifest_rows": total, "ok": info["ok"], "failed": failed}
        bundle.save()
        log(f"embeddings: {info['ok']:,} ok, {failed:,} failed (see {Path(cfg.out) / ERRORS_FILE})")
    run_stages(bundle, cfg.stage_configs, cfg.stages, cfg.force, log, mapper=ray_map if cfg.ray is not None else map,
               disk=disk)
    bundle.end_build()
    return bundle


def add_photos(root: str | Path, manifest: str | None = None, embeddings: str | None = None,
               image_root: str | None = None, embedding_column: str = "embedding", refit: bool = False,
               embed: EmbedConfig = EmbedConfig(), configs: StageConfigs | None = None, log: Log = print,
               progress: bool = True) -> Bundle:
    """Append photos (or precomputed embeddings) to a built bundle without rebuilding it.

    New shards are numbered after the bundle's; the kNN index takes the new
    vectors; the cells' counts, means and support spots and the gallery's points
    and prior are recomputed over all photos with the fitted partitions, heads
    and location encoder. Those fitted parts (and fusion) are refitted only with
    ``refit``; until then the manifest records them as stale and ``geo info`` says so. A refit uses the
    build's recorded settings and skipped stages (``configs`` overrides the former; a bundle recorded
    without settings refits with the defaults). Ids already in the bundle are error rows. Adding the same input twice is refused;
    an interrupted addition resumes.
    """
    if (manifest is None) == (embeddings is None):
        raise ValueError("give either a manifest (photos) or --embeddings (precomputed), not both or neither")
    open_bundle(root)  # refused before the lock when it is no bundle at all
    with writing(root, log):
        return _add(root, manifest, embeddings, image_root, embedding_column, refit, embed, configs, log, progress)


def _add(root: str | Path, manifest: str | None, embeddings: str | None, image_root: str | None,
         embedding_column: str, refit: bool, embed: EmbedConfig, configs: StageConfigs | None, log: Log,
         progress: bool) -> Bundle:
    bundle = open_bundle(root)
    bundle.stage("knn_index")
    reader = EmbeddingReader(bundle)
    existing = set(reader.read_meta(["id"])["id"].astype(str))
    additions = bundle.manifest.setdefault("additions", [])
    if embeddings is not None:
        table = EmbeddingTable(embeddings, embedding_column, dim=int(bundle.manifest["dim"]))
        fingerprint, rejected, rows_in = table.fingerprint, [], table.rows
    else:
        man = read_manifest(manifest, image_root)
        dup = man.df["id"].astype(str).isin(existing).to_numpy()
        rejected = [*man.errors, *({"path": p, "stage": "manifest", "reason": f"id {i!r} is already in the bundle"}
                                   for i, p in zip(man.df["id"][dup], man.df["path"][dup]))]
        new_rows = man.df[~dup].reset_index(drop=True)
        if new_rows.empty:
            raise ManifestError(f"{man.source}: nothing to add: {int(dup.sum()):,} rows are already in the bundle "
                                f"and {len(man.errors):,} were rejected; the bundle is unchanged")
        fingerprint, rows_in = manifest_fingerprint(new_rows), len(man.df) + len(man.errors)
    record = next((a for a in additions if a["fingerprint"] == fingerprint), None)
    if record is not None and record.get("done"):
        raise BundleError(f"{bundle.root}: this input was already added on {record['started']}; nothing to do")
    if record is None:
        record = {"fingerprint": fingerprint, "first_shard": len(reader.shards), "rows": rows_in,
                  "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "done": False}
        additions.append(record)
        bundle.save()
    log(f"add: {rows_in:,} rows into {bundle.root} after its {len(existing):,} photos")
    t0 = time.perf_counter()
    if embeddings is not None:
        files, info = ingest_embeddings(bundle, table, embed, progress, record["first_shard"], existing)
    else:
        backbone = backbone_from_spec(bundle.manifest["backbone"])
        files, info = run_embedding_stage(bundle, new_rows, backbone, embed, progress, record["first_shard"])
    bundle.commit("embeddings", files, {**info, "stage_seconds": round(time.perf_counter() - t0, 2)},
                  replace=STAGE_FOLDERS["embeddings"])
    failed = write_errors(bundle, rejected, keep_earlier=True)
    added = info["ok"] - len(existing)
    bundle.manifest["counts"] = {"manifest_rows": bundle.manifest.get("counts", {}).get("manifest_rows", 0) + rows_in,
                                 "ok": info["ok"], "failed": failed}
    log(f"add: {added:,} photos added, {failed:,} failures in all (see {bundle.path(ERRORS_FILE)})")

    reader = EmbeddingReader(bundle)
    t0 = time.perf_counter()
    index = read_index(bundle, use_gpu=False, mmap=False)  # a resumed addition may find some new rows already in it
    for _, emb in _rows_after(reader, index.ntotal):
        index.add(emb)
    meta = reader.read_meta(["id", "path", "lat", "lon"])
    knn = KnnIndex(index, meta, {**bundle.stage("knn_index"), "ntotal": int(index.ntotal)})
    files, infos = knn.save(bundle)
    bundle.commit("knn_index", files, {**infos, "stage_seconds": round(time.perf_counter() - t0, 2)},
                  replace=STAGE_FOLDERS["knn_index"])
    lat, lon = meta["lat"].to_numpy(np.float64), meta["lon"].to_numpy(np.float64)
    if refit:
        settings = from_dict(recorded(bundle.manifest))
        run_stages(bundle, configs or settings.stages, settings.stage_names(STAGES), ("cells", "gallery", "fusion"),
                   log)
        bundle.manifest.pop("stale", None)
    else:
        if bundle.has_stage("cells"):
            files, cinfo = cells_with_photos(CellPredictor.load(bundle), lat, lon).save(bundle)
            bundle.commit("cells", files, cinfo, replace=STAGE_FOLDERS["cells"])
        if bundle.has_stage("gallery"):
            files, ginfo = gallery_with_photos(GpsGallery.load(bundle, with_location_encoder=True),
                                               np.stack([lat, lon], -1)).save(bundle)
            bundle.commit("gallery", files, ginfo, replace=STAGE_FOLDERS["gallery"])
        stale = bundle.manifest.setdefault("stale", {"photos_added": 0, "what": []})
        stale["photos_added"] += added
        stale["what"] = [s for s in ("cells", "gallery", "fusion") if bundle.has_stage(s)]
    record["done"] = True
    bundle.save()
    return bundle


def _rows_after(reader: EmbeddingReader, skip: int):
    """The embeddings after the first ``skip`` rows, in pieces."""
    seen = 0
    for meta, emb in reader.iter(columns=[]):
        if seen + len(emb) > skip:
            yield meta, emb[max(0, skip - seen):]
        seen += len(emb)


def plan_stages(cfg: BuildConfig, n: int, dim: int, flops: float | None = None) -> list[StagePlan]:
    """Each stage's plan and estimate for ``n`` photos of ``dim``-d embeddings under this config (with ``flops``,
    the FAISS candidates priced too: what ``--dry-run`` prints)."""
    c = cfg.stage_configs
    return plan_build(n, dim, c.knn.ram_budget, c.knn.exact_max, c.gallery.max_points, c.gallery.epochs,
                      c.gallery.round_photos, c.fusion.folds, c.fusion.single_split_above, c.fusion.max_queries,
                      cfg.stages, c.train_photos, flops)


def dry_run(cfg: BuildConfig, log: Log = print) -> list[StagePlan]:
    """Read the input's size (not its content) and say what each stage would do and need; builds nothing."""
    if cfg.embeddings is not None:
        table = EmbeddingTable(cfg.embeddings, cfg.embedding_column)
        n, dim = table.rows, table.dim
        log(f"input: {n:,} precomputed {dim}-d embeddings in {len(table.parts)} file(s)")
    else:
        man = read_manifest(cfg.manifest, cfg.image_root)
        n, dim = len(man.df), load_backbone(cfg.backbone, device="cpu", weights=cfg.weights).dim
        log(f"input: {n:,} photos ({len(man.errors):,} rows rejected), {cfg.backbone} gives {dim}-d embeddings")
    plans = plan_stages(cfg, n, dim, matmul_flops())
    for p in plans:
        log(p.line())
    log(f"memory budget {human_bytes(cfg.memory)} (--memory)")
    check(plans, cfg.memory)
    return plans


def backbone_spec(name: str, weights: str | None, log: Log) -> dict[str, Any]:
    """What a bundle of precomputed embeddings records about the model that made them.

    The model is built once (on the CPU) to record its preprocessing and
    dimension, so that ``geo query photo.jpg`` embeds with the same one. When it
    cannot be built here (weights that live on another machine), the name alone
    is recorded: queries by precomputed embedding work, queries by image say
    what is missing.
    """
    try:
        return load_backbone(name, device="cpu", weights=weights).spec()
    except (BackboneError, OSError, RuntimeError) as e:
        log(f"backbone: {name} cannot be loaded here ({e}); recording its name only: "
            "`geo query --embeddings` works, `geo query photo.jpg` needs the model")
        return {"name": name, "weights": {"kind": "unavailable", "reason": str(e)}}


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
               log: Log = print, mapper: Callable[[Callable, list], Iterable] = map,
               disk: dict[str, int] | None = None) -> None:
    """Fit, save and commit the stages after the embeddings that ``stages`` names and the bundle lacks (or ``force``).

    ``mapper`` runs the kNN index's per-shard population (``map``, or :func:`geo.cluster.ray_map`); ``disk``
    (the plan's bytes per stage) is checked against the free space before each stage starts."""
    configs = configs.resolved()

    def wanted(stage: str) -> bool:
        if stage in stages and (stage in force or not bundle.has_stage(stage)):
            ensure_free_space(bundle.root, (disk or {}).get(stage, 0), f"the {stage} stage")
            return True
        return False

    def commit(stage: str, artifact: Any, t0: float) -> None:
        files, info = artifact.save(bundle)
        bundle.commit(stage, files, {**info, "stage_seconds": round(time.perf_counter() - t0, 2)},
                      replace=STAGE_FOLDERS[stage])

    reader = EmbeddingReader(bundle)
    if wanted("knn_index"):
        t0 = time.perf_counter()
        commit("knn_index", fit_knn(reader, configs.knn, log=log, mapper=mapper), t0)
    trained = [s for s in ("cells", "gallery") if wanted(s)]
    retune = wanted("fusion") or (bool(trained) and "fusion" in stages)  # retune whenever a signal changed
    if not trained and not retune:
        return
    n_photos = reader.count
    if n_photos < MIN_TRAINED_PHOTOS:
        log(f"cells, gallery, fusion: skipped, {n_photos} photos is below {MIN_TRAINED_PHOTOS}; answers use kNN")
        for stage in ("cells", "gallery", "fusion"):
            bundle.skip_stage(stage, f"{n_photos} photos, below {MIN_TRAINED_PHOTOS}")
        return
    schema = reader.columns
    col = group_column(schema, configs.group_column)
    meta_all = reader.read_meta(["lat", "lon", *([col] if col else [])])  # every photo; no embeddings
    groups = meta_all[col].astype(str).to_numpy() if col else None
    held = validation_mask(n_photos, groups, VAL_FRACTION, SPLIT_SEED)  # the photographers no stage trains on
    latlon = meta_all[["lat", "lon"]].to_numpy(np.float64)
    backbone = str(bundle.manifest.get("backbone", {}).get("name", ""))
    large = n_photos > configs.fusion.single_split_above
    if trained or not large:  # the training sample (every photo up to train_photos), with the held-out marks
        rows = training_rows(n_photos, configs.train_photos, SPLIT_SEED)
        meta, emb = reader.take(rows)
        val = held if rows is None else held[rows]
    if "cells" in trained:
        t0 = time.perf_counter()
        commit("cells", fit_cells(meta, emb, configs.cells, log=log, val=val, photos=(latlon[:, 0], latlon[:, 1])), t0)
    if "gallery" in trained:
        t0 = time.perf_counter()
        commit("gallery", fit_gallery(meta, emb, configs.gallery, backbone, log=log, val=val, photos=latlon), t0)
    if retune:
        t0 = time.perf_counter()
        has_cells, has_gallery = bundle.has_stage("cells"), bundle.has_stage("gallery")
        if large:
            if trained:
                del meta, emb  # fusion reads its held-out queries again: a few thousand rows
            model = fit_fusion_on_built(
                meta_all, held, lambda r: reader.take(r, columns=[])[1], lambda: KnnIndex.load(bundle, use_gpu=False),
                (lambda: CellPredictor.load(bundle)) if has_cells else None,
                (lambda: GpsGallery.load(bundle, with_location_encoder=True)) if has_gallery else None,
                configs.fusion, log=log)
        else:
            signal_stages = SignalStages(configs.cells if has_cells else None,
                                         configs.gallery if has_gallery else None, backbone)
            model = fit_fusion(meta, emb, signal_stages, configs.fusion, log=log)
        commit("fusion", model, t0)
    stale = bundle.manifest.get("stale")
    if stale:  # refitted stages are current again (geo add left them stale)
        stale["what"] = [w for w in stale["what"] if w not in {*trained, *(["fusion"] if retune else [])}]
        if not stale["what"]:
            bundle.manifest.pop("stale")
        bundle.save()

