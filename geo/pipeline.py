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
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from geo.core.files import NO_CAP, FileRefused, on_disk, read_capped, regular_size
from geo.core.memory import map_large_blocks, own_garbage_only, release_unused
from geo.core.runtime import matmul_flops
from geo.core.sizes import human_bytes
from geo.core.splits import group_column, training_rows, validation_mask
from geo.data.embedding_table import EmbeddingTable
from geo.data.manifest import ManifestError, ManifestResult, read_manifest
from geo.executors import LOCAL, Executor, executor_for
from geo.models.backbones import BackboneError, backbone_from_spec, load_backbone
from geo.models.registry import Backbone
from geo.plan import StagePlan, check, default_memory, index_budget, plan_build, process_peak
from geo.settings import StageConfigs, build_record, from_dict, recorded
from geo.stages.cells.predictor import CellPredictor
from geo.stages.cells.stage import fit_cells
from geo.stages.cells.stage import with_photos as cells_with_photos
from geo.stages.embed import EmbedConfig, check_plan, ingest_embeddings, manifest_fingerprint
from geo.stages.fusion.stage import FusionModel, SignalStages, fit_fusion, fit_fusion_on_built
from geo.stages.gallery.stage import GEOCLIP_GALLERY, GpsGallery, extra_points, fit_gallery
from geo.stages.gallery.stage import with_photos as gallery_with_photos
from geo.stages.knn import KnnIndex, fit_knn, read_index
from geo.store.atomic import atomic_write_parquet, ensure_free_space, restore_interrupted, restored_on_failure
from geo.store.bundle import Bundle, BundleError, open_bundle
from geo.store.embeddings import EmbeddingReader, drop_unlisted_shards, marker_path, shard_errors, write_shard
from geo.store.lock import writing

if TYPE_CHECKING:
    import pandas as pd

ERRORS_FILE = "errors.parquet"
# Below this many photos, cell heads, a location encoder and fusion weights would be fitted to noise;
# such bundles answer by kNN alone and say so.
MIN_TRAINED_PHOTOS = 50
GEOCLIP_GALLERY_POINTS = 100_000  # the rows of GeoCLIP's gps_gallery_100K.csv
GPS_LINE_BYTES = 20
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
    # population; None: this process only. The build turns it into its one executor (geo.executors).
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
    import pandas as pd

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

    The executor (this process, or a Ray cluster with ``cfg.ray``) is chosen here, once, and passed down. The
    bundle's write lock (:func:`geo.store.lock.writing`) is held from before the model loads to the end, so a
    second build of the same ``out`` is refused at once."""
    if (cfg.manifest is None) == (cfg.embeddings is None):
        raise ValueError("give either a manifest (photos) or --embeddings (precomputed), not both or neither")
    executor = executor_for(cfg.ray, cfg.device, cfg.precision, log)
    man = None
    if cfg.manifest is not None:
        man = read_manifest(cfg.manifest, cfg.image_root)
        log(f"manifest: {len(man.df):,} usable rows, {len(man.errors):,} rejected ({man.source})")
        if man.df.empty and not Path(cfg.out, "manifest.json").exists():  # before a model load or a bundle
            reasons = "; ".join(f"{Path(e['path']).name}: {e['reason']}" for e in man.errors[:3])
            raise ManifestError(f"{man.source}: nothing to index, {len(man.errors)} inputs rejected"
                                + (f" ({reasons}{', ...' if len(man.errors) > 3 else ''})" if reasons else "")
                                + "; no bundle was written")
    map_large_blocks()
    with writing(cfg.out, log), own_garbage_only():
        return _build(cfg, man, executor, log, progress)


@dataclass
class EmbeddingInput:
    """What a build or an addition embeds, read once: manifest rows (``photos``) or precomputed embeddings
    (``table``). Build and ``geo add`` share it, so both embed, commit and count the same way."""

    rows: int  # rows to embed
    total: int  # rows read, rejected ones included: what the manifest count adds up
    fingerprint: str  # the input's identity: a resume against another input is refused
    rejected: list[dict]
    photos: pd.DataFrame | None = None
    table: EmbeddingTable | None = None

    @classmethod
    def of_photos(cls, rows: pd.DataFrame, rejected: list[dict], total: int) -> "EmbeddingInput":
        return cls(len(rows), total, manifest_fingerprint(rows), rejected, photos=rows)

    @classmethod
    def of_table(cls, table: EmbeddingTable) -> "EmbeddingInput":
        return cls(table.rows, table.rows, table.fingerprint, [], table=table)

    def embed(self, bundle: Bundle, executor: Executor, backbone: Backbone | None, cfg: EmbedConfig,
              progress: bool, first_shard: int, seen: set[str] | None) -> tuple[list[Path], dict[str, Any]]:
        if self.table is not None:  # already vectors: read and checked here, whatever the executor
            return ingest_embeddings(bundle, self.table, cfg, progress, first_shard, seen)
        return executor.embed(bundle, self.photos, backbone, cfg, progress, first_shard)


def _build(cfg: BuildConfig, man: ManifestResult | None, executor: Executor, log: Log, progress: bool) -> Bundle:
    bundle, source, backbone, plans = _open_for_build(cfg, man, log)
    bundle.begin_build(cfg.stages, build_record(cfg.stage_configs, cfg.embed, cfg.stages))
    disk = {p.stage: p.disk for p in plans}
    if "embeddings" in cfg.stages:  # always run: it resumes shard by shard and is a no-op when complete
        written = sum(f.stat().st_size for f in bundle.path("embeddings").glob("*") if f.is_file()) \
            if bundle.path("embeddings").is_dir() else 0
        ensure_free_space(bundle.root, max(disk["embeddings"] - written, 0), "the embeddings stage")
        _claim_plan(bundle, source, cfg.embed.shard_rows)
        info, failed = _embed_input(bundle, source, executor, backbone, cfg.embed, progress, first_shard=0)
        log(f"embeddings: {info['ok']:,} ok, {failed:,} failed (see {Path(cfg.out) / ERRORS_FILE})")
    run_stages(bundle, cfg.stage_configs, cfg.stages, cfg.force, log, executor, disk)
    bundle.end_build()
    return bundle


def _open_for_build(cfg: BuildConfig, man: ManifestResult | None,
                    log: Log) -> tuple[Bundle, EmbeddingInput, Backbone | None, list[StagePlan]]:
    """The input, the backbone (None for precomputed embeddings: only its spec is recorded) and the checked
    plan, then the bundle created or resumed: nothing is written before the plan fits the memory budget."""
    if man is None:
        spec = backbone_spec(cfg.backbone, cfg.weights, log)
        table = EmbeddingTable(cfg.embeddings, cfg.embedding_column, dim=spec.get("dim"))
        spec.setdefault("dim", table.dim)
        log(f"embeddings: {table.rows:,} rows of {table.dim}-d from {len(table.parts)} file(s) ({cfg.embeddings})")
        source, backbone, dim = EmbeddingInput.of_table(table), None, table.dim
    else:
        backbone = load_backbone(cfg.backbone, device=cfg.device, precision=cfg.precision, weights=cfg.weights)
        log(f"backbone: {backbone.name} ({backbone.dim}-d) on {backbone.device}")
        source = EmbeddingInput.of_photos(man.df, man.errors, len(man.df) + len(man.errors))
        spec, dim = backbone.spec(), backbone.dim
    plans = plan_stages(cfg, source.rows, dim)
    check(plans, cfg.memory)
    return Bundle.create_or_resume(cfg.out, spec, dim), source, backbone, plans


def _claim_plan(bundle: Bundle, source: EmbeddingInput, shard_rows: int) -> None:
    """Record what this bundle embeds before its first shard; a resume against another input is refused."""
    check_plan(bundle, source.fingerprint, shard_rows)
    bundle.manifest.setdefault("plan", {})["embeddings"] = {"fingerprint": source.fingerprint,
                                                           "shard_rows": shard_rows, "rows": source.rows}
    bundle.save()


def _embed_input(bundle: Bundle, source: EmbeddingInput, executor: Executor, backbone: Backbone | None,
                 cfg: EmbedConfig, progress: bool, first_shard: int, seen: set[str] | None = None,
                 rows_before: int = 0) -> tuple[dict[str, Any], int]:
    """Embed ``source`` into shards from ``first_shard`` on, commit them, write every failure and the counts:
    the one embedding step of a build (``first_shard`` 0) and of an addition. Returns (stage info, failures)."""
    t0 = time.perf_counter()
    files, info = source.embed(bundle, executor, backbone, cfg, progress, first_shard, seen)
    bundle.commit("embeddings", files, {**info, "stage_seconds": round(time.perf_counter() - t0, 2)},
                  replace=STAGE_FOLDERS["embeddings"])
    release_unused()
    failed = write_errors(bundle, source.rejected, keep_earlier=first_shard > 0)
    bundle.manifest["counts"] = {"manifest_rows": rows_before + source.total, "ok": info["ok"], "failed": failed}
    bundle.save()
    return info, failed


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
    without settings refits with the defaults). Ids already in the bundle are error rows. Adding the same
    input twice is refused; an interrupted addition resumes.
    """
    if (manifest is None) == (embeddings is None):
        raise ValueError("give either a manifest (photos) or --embeddings (precomputed), not both or neither")
    open_bundle(root, verify=False)  # refused before the lock when it is no bundle at all
    map_large_blocks()
    with writing(root, log), own_garbage_only():
        restore_interrupted(root)  # a killed addition's rewritten files, before the sizes are checked
        bundle = open_bundle(root)
        bundle.stage("knn_index")
        existing = set(EmbeddingReader(bundle).read_meta(["id"])["id"].astype(str))
        source = _addition_input(bundle, manifest, embeddings, image_root, embedding_column, existing)
        return _add(bundle, source, existing, refit, embed, configs, log, progress)


def _addition_input(bundle: Bundle, manifest: str | None, embeddings: str | None, image_root: str | None,
                    embedding_column: str, existing: set[str]) -> EmbeddingInput:
    """The photos or embeddings to add; manifest rows whose id the bundle already holds become error rows."""
    if embeddings is not None:
        return EmbeddingInput.of_table(EmbeddingTable(embeddings, embedding_column, dim=int(bundle.manifest["dim"])))
    man = read_manifest(manifest, image_root)
    dup = man.df["id"].astype(str).isin(existing).to_numpy()
    rejected = [*man.errors, *({"path": p, "stage": "manifest", "reason": f"id {i!r} is already in the bundle"}
                               for i, p in zip(man.df["id"][dup], man.df["path"][dup]))]
    new_rows = man.df[~dup].reset_index(drop=True)
    if new_rows.empty:
        raise ManifestError(f"{man.source}: nothing to add: {int(dup.sum()):,} rows are already in the bundle "
                            f"and {len(man.errors):,} were rejected; the bundle is unchanged")
    twins = _same_content(new_rows, EmbeddingReader(bundle).read_meta(["id", "path"]))
    if twins:
        shown = "; ".join(f"{new!r} is the photo indexed as {old!r}" for new, old in twins[:3])
        raise ManifestError(f"{man.source}: {len(twins):,} photos are already in the bundle under another id "
                            f"({shown}{'; ...' if len(twins) > 3 else ''}); remove them from the input and re-run "
                            "(the bundle is unchanged)")
    return EmbeddingInput.of_photos(new_rows, rejected, len(man.df) + len(man.errors))


def _same_content(new: pd.DataFrame, indexed: pd.DataFrame) -> list[tuple[str, str]]:
    """(new id, indexed id) for each new photo whose file holds the bytes of a photo the bundle indexed (found by
    sha256; only files of a size in common are read). Indexed photos no longer on disk cannot be compared."""
    def sizes(paths: pd.Series) -> pd.Series:
        import pandas as pd

        def size(p: str) -> int:
            try:
                return regular_size(on_disk(p))
            except (FileRefused, OSError):
                return -1
        return pd.Series([size(p) for p in paths], index=paths.index)

    def digest(p: str) -> str | None:
        try:
            return hashlib.sha256(read_capped(on_disk(p))).hexdigest()
        except (FileRefused, OSError):
            return None

    new_size, old_size = sizes(new["path"]), sizes(indexed["path"])
    common = set(new_size[new_size >= 0]) & set(old_size[old_size >= 0])
    if not common:
        return []
    old_hash = {h: i for i, p in zip(indexed["id"][old_size.isin(common)], indexed["path"][old_size.isin(common)])
                if (h := digest(p)) is not None}
    return [(str(i), str(old_hash[h])) for i, p in zip(new["id"][new_size.isin(common)], new["path"][new_size.isin(common)])
            if (h := digest(p)) in old_hash]


def _add(bundle: Bundle, source: EmbeddingInput, existing: set[str], refit: bool, embed: EmbedConfig,
         configs: StageConfigs | None, log: Log, progress: bool) -> Bundle:
    record = _addition_record(bundle, source)
    log(f"add: {source.total:,} rows into {bundle.root} after its {len(existing):,} photos")
    backbone = backbone_from_spec(bundle.manifest["backbone"]) if source.photos is not None else None
    # the files rewritten in place come back, and the manifest is not written, unless the whole addition succeeds:
    # its shards reach readers in the one commit at the end (a re-run of a failed one resumes from its shards)
    rewritten = [rel for rel in bundle.manifest["files"] if not rel.startswith(STAGE_FOLDERS["embeddings"])]
    with restored_on_failure(bundle.root, rewritten), bundle.one_commit():
        info, failed = _embed_input(bundle, source, LOCAL, backbone, embed, progress, record["first_shard"],
                                    existing, rows_before=record["manifest_rows_before"])
        added = info["ok"] - len(existing)
        log(f"add: {added:,} photos added, {failed:,} failures in all (see {bundle.path(ERRORS_FILE)})")
        lat, lon = _extend_knn(bundle)
        if refit:  # with the build's recorded settings and skipped stages
            settings = from_dict(recorded(bundle.manifest))
            run_stages(bundle, configs or settings.stages, settings.stage_names(STAGES),
                       ("cells", "gallery", "fusion"), log)
            bundle.manifest.pop("stale", None)
        else:
            _refresh_with_photos(bundle, lat, lon, added)
        record["done"] = True
    return bundle


def _addition_record(bundle: Bundle, source: EmbeddingInput) -> dict[str, Any]:
    """This addition's record in the manifest (new, or the unfinished one a re-run resumes); a finished one of the
    same input is refused."""
    additions = bundle.manifest.setdefault("additions", [])
    record = next((a for a in additions if a["fingerprint"] == source.fingerprint), None)
    if record is not None and record.get("done"):
        raise BundleError(f"{bundle.root}: this input was already added on {record['started']}; nothing to do")
    if record is None:  # a new input: an unfinished addition of another is abandoned, with its shards
        bundle.manifest["additions"] = additions = [a for a in additions if a.get("done")]
        drop_unlisted_shards(bundle)
        record = {"fingerprint": source.fingerprint, "first_shard": len(EmbeddingReader(bundle).shards),
                  "rows": source.total, "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "manifest_rows_before": bundle.manifest.get("counts", {}).get("manifest_rows", 0), "done": False}
        additions.append(record)
        bundle.save()
    # an addition recorded before this key existed counts from where the bundle stands
    record.setdefault("manifest_rows_before", bundle.manifest.get("counts", {}).get("manifest_rows", 0))
    return record


def _extend_knn(bundle: Bundle) -> tuple[np.ndarray, np.ndarray]:
    """Add the new shards' vectors to the FAISS index and commit it; returns every photo's (lat, lon)."""
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
    return meta["lat"].to_numpy(np.float64), meta["lon"].to_numpy(np.float64)


def _refresh_with_photos(bundle: Bundle, lat: np.ndarray, lon: np.ndarray, added: int) -> None:
    """Without a refit: the cells' counts, means and support spots and the gallery's points and prior over every
    photo, with the fitted partitions, heads and encoder; the fitted parts are recorded as stale."""
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
                      c.gallery.round_photos, c.fusion.folds, c.fusion.single_split_above,
                      max(c.fusion.max_queries, c.fusion.rerank_queries),  # what the large path scores
                      cfg.stages, c.train_photos, cfg.embed.shard_rows, flops, _gps_gallery_points(cfg))


def _gps_gallery_points(cfg: BuildConfig) -> int:
    """How many points the GPS gallery adds to the photos' places: GeoCLIP's 100K (its default for a GeoCLIP
    backbone), a --gps-gallery file's rows (estimated from its size: a "lat,lon" line is about 20 bytes), or
    none."""
    gps = extra_points(cfg.stage_configs.gallery, cfg.backbone)
    if gps is None:
        return 0
    if str(gps) == GEOCLIP_GALLERY:
        return GEOCLIP_GALLERY_POINTS
    try:
        return regular_size(gps, cap=NO_CAP) // GPS_LINE_BYTES
    except (FileRefused, OSError):
        return 0  # the stage names the file and what is wrong with it when it starts


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
    worst = max(plans, key=lambda p: p.memory)
    log(f"one process: peak ~{human_bytes(process_peak(plans))} (the process itself and the {worst.stage} stage); "
        f"memory budget {human_bytes(cfg.memory)} (--memory)")
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
    with own_garbage_only():
        run_stages(bundle, configs, stages, (), log)
    return bundle


def run_stages(bundle: Bundle, configs: StageConfigs, stages: tuple[str, ...] = STAGES, force: tuple[str, ...] = (),
               log: Log = print, executor: Executor = LOCAL, disk: dict[str, int] | None = None) -> None:
    """Fit, save and commit the stages after the embeddings that ``stages`` names and the bundle lacks (or ``force``).

    The kNN index is filled shard by shard (through ``executor.mapper`` on a cluster); cells and gallery are fitted on the training
    sample; fusion is re-tuned whenever a signal it mixes changed. ``disk`` (the plan's bytes per stage) is
    checked against the free space before each stage starts."""
    configs = configs.resolved()

    def wanted(stage: str) -> bool:
        if stage in stages and (stage in force or not bundle.has_stage(stage)):
            ensure_free_space(bundle.root, (disk or {}).get(stage, 0), f"the {stage} stage")
            return True
        return False

    reader = EmbeddingReader(bundle)
    if wanted("knn_index"):
        _fit_and_commit(bundle, "knn_index", lambda: fit_knn(reader, configs.knn, log=log, mapper=executor.mapper))
    trained = [s for s in ("cells", "gallery") if wanted(s)]
    retune = wanted("fusion") or (bool(trained) and "fusion" in stages)  # retune whenever a signal changed
    if not trained and not retune:
        return
    if reader.count < MIN_TRAINED_PHOTOS:
        log(f"cells, gallery, fusion: skipped, {reader.count} photos is below {MIN_TRAINED_PHOTOS}; answers use kNN")
        for stage in ("cells", "gallery", "fusion"):
            bundle.skip_stage(stage, f"{reader.count} photos, below {MIN_TRAINED_PHOTOS}")
        return
    data = TrainingData.read(reader, bundle, configs, sample=bool(trained) or not _large(reader, configs))
    _fit_trained(bundle, trained, data, configs, log)
    if retune:
        _fit_and_commit(bundle, "fusion", lambda: _tune_fusion(bundle, reader, data, configs, log))
    _mark_current(bundle, [*trained, *(["fusion"] if retune else [])])


def _large(reader: EmbeddingReader, configs: StageConfigs) -> bool:
    """Whether fusion scores held-out photographers against the built stages instead of refitting them per fold."""
    return reader.count > configs.fusion.single_split_above


@dataclass
class TrainingData:
    """What the trained stages and fusion read: every photo's coordinates (no embeddings), the photographers that
    every trained stage holds out (chosen once, here), and the training sample with its held-out marks."""

    meta_all: pd.DataFrame
    held: np.ndarray
    latlon: np.ndarray
    backbone: str
    meta: pd.DataFrame | None = None  # the sample (every photo up to ``train_photos``); None when not read
    emb: np.ndarray | None = None
    val: np.ndarray | None = None

    @classmethod
    def read(cls, reader: EmbeddingReader, bundle: Bundle, configs: StageConfigs, sample: bool) -> "TrainingData":
        col = group_column(reader.columns, configs.group_column)
        meta_all = reader.read_meta(["lat", "lon", *([col] if col else [])])
        groups = meta_all[col].astype(str).to_numpy() if col else None
        held = validation_mask(reader.count, groups, VAL_FRACTION, SPLIT_SEED)
        data = cls(meta_all, held, meta_all[["lat", "lon"]].to_numpy(np.float64),
                   str(bundle.manifest.get("backbone", {}).get("name", "")))
        if sample:
            rows = training_rows(reader.count, configs.train_photos, SPLIT_SEED)
            # a large gallery's sample feeds only the heads and the gallery, a batch at a time: float16 halves
            # what every trained stage holds (fusion refits stages on a small one's, in float32)
            data.meta, data.emb = reader.take(rows, dtype=np.float16 if _large(reader, configs) else np.float32)
            data.val = held if rows is None else held[rows]
        return data


def _fit_and_commit(bundle: Bundle, stage: str, fit: Callable[[], Any]) -> None:
    """Fit a stage's artifact, save its files (its own folder only) and commit them with the stage's info."""
    t0 = time.perf_counter()
    files, info = fit().save(bundle)
    bundle.commit(stage, files, {**info, "stage_seconds": round(time.perf_counter() - t0, 2)},
                  replace=STAGE_FOLDERS[stage])
    release_unused()  # what the stage freed, given back before the next one starts


def _fit_trained(bundle: Bundle, trained: list[str], data: TrainingData, configs: StageConfigs, log: Log) -> None:
    """The cell heads and the GPS gallery, on the training sample, validated on the held-out photographers."""
    lat, lon = data.latlon[:, 0], data.latlon[:, 1]
    if "cells" in trained:
        _fit_and_commit(bundle, "cells", lambda: fit_cells(data.meta, data.emb, configs.cells, log=log,
                                                           val=data.val, photos=(lat, lon)))
    if "gallery" in trained:
        _fit_and_commit(bundle, "gallery", lambda: fit_gallery(data.meta, data.emb, configs.gallery, data.backbone,
                                                               log=log, val=data.val, photos=data.latlon))


def _tune_fusion(bundle: Bundle, reader: EmbeddingReader, data: TrainingData, configs: StageConfigs,
                 log: Log) -> FusionModel:
    """Fusion's weights on out-of-fold evidence: the signal stages refitted per photographer fold (small galleries),
    or the built stages scored on the held-out photographers (large ones: no stage is fitted again)."""
    has_cells, has_gallery = bundle.has_stage("cells"), bundle.has_stage("gallery")
    if not _large(reader, configs):
        signal_stages = SignalStages(configs.cells if has_cells else None,
                                     configs.gallery if has_gallery else None, data.backbone)
        return fit_fusion(data.meta, data.emb, signal_stages, configs.fusion, log=log)
    data.meta = data.emb = None  # fusion reads its held-out queries again: a few thousand rows
    return fit_fusion_on_built(
        data.meta_all, data.held, lambda r: reader.take(r, columns=[])[1], lambda: KnnIndex.load(bundle, use_gpu=False),
        (lambda: CellPredictor.load(bundle)) if has_cells else None,
        (lambda: GpsGallery.load(bundle, with_location_encoder=True)) if has_gallery else None,
        configs.fusion, log=log)


def _mark_current(bundle: Bundle, refitted: list[str]) -> None:
    """Refitted stages are current again (``geo add`` left them stale)."""
    stale = bundle.manifest.get("stale")
    if stale:
        stale["what"] = [w for w in stale["what"] if w not in refitted]
        if not stale["what"]:
            bundle.manifest.pop("stale")
        bundle.save()
