"""``geo build-index``: geotagged photos in, an index bundle out (resumable)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from geo.cli.common import fail
from geo.core.sizes import parse_bytes
from geo.core.answer import PRIOR_ONLY
from geo.core.progress import showing
from geo.models.hub import allow_downloads
from geo.pipeline import STAGES, BuildConfig, StageConfigs, add_photos, build_index
from geo.pipeline import dry_run as dry_run_build
from geo.stages.cells.partition import PARTITIONERS
from geo.stages.cells.stage import CellsConfig
from geo.stages.embed import EmbedConfig
from geo.stages.fusion.posterior import FusionParams, learned_summary
from geo.stages.gallery.stage import GalleryConfig
from geo.stages.knn import KnnConfig

SKIPPABLE = ("cells", "gallery", "fusion")
FORCEABLE = ("knn_index", "cells", "gallery", "fusion")


def build_index_command(
    manifest: Optional[Path] = typer.Argument(None, help="CSV/Parquet with an image column (path, image, IMG_ID, id) and "
                                              "lat/lon columns, or a folder of photos whose EXIF carries GPS."),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle directory to create, or to resume if it exists."),
    embeddings: Optional[Path] = typer.Option(None, "--embeddings", help="Precomputed embeddings instead of photos: a "
                                              "Parquet file or folder (an embedding column, lat/lon, optional id and "
                                              "group columns, extras kept) or clip-retrieval output (img_emb/*.npy + "
                                              "metadata/*.parquet). Name the model that made them with --backbone."),
    embedding_column: str = typer.Option("embedding", help="Column of --embeddings Parquet holding the vectors."),
    image_root: Optional[Path] = typer.Option(None, help="Directory that relative image paths in the manifest start from."),
    backbone: str = typer.Option("efficientnet_lite0", help="Image model; see `geo backbones`."),
    weights: Optional[Path] = typer.Option(None, help="Local weights file for timm:/torchvision: backbones (safetensors or .pth)."),
    allow_download: bool = typer.Option(False, "--allow-download", help="Let open_clip/GeoCLIP backbones fetch their "
                                        "weights from the Hugging Face hub. Without it nothing is downloaded: weights "
                                        "must be in the hub cache or a local-dir, or the build stops at once saying how."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    precision: str = typer.Option("auto", help="auto (fp16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16"),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    workers: int = typer.Option(-1, help="Decoding processes; -1 = one per core (max 8), 0 = in-process."),
    shard_size: int = typer.Option(50_000, help="Rows per embedding shard (the unit of resume)."),
    ram_budget: str = typer.Option("8GB", help="Memory the FAISS index may use; picks Flat / IVF-Flat / IVF-PQ."),
    exact_max: int = typer.Option(100_000, help="Largest gallery indexed exactly (IndexFlatIP)."),
    cells: list[Path] = typer.Option([], "--cells", help="Published GeoEstimation cell CSV(s) to assign the gallery to "
                                     "(repeatable, coarse to fine) instead of building adaptive partitions."),
    partitioner: str = typer.Option("adaptive", help="adaptive (PlaNet/Müller-Budack S2 splitting) | bottomup (seed 002 hot spots) | "
                                     "semantic (PIGEON: country borders, then Voronoi cells around where photos cluster)."),
    tau_min: Optional[int] = typer.Option(None, help="Drop cells with fewer photos (default scales with gallery size)."),
    tau_max: list[int] = typer.Option([], help="Split cells with more photos; one per partition (repeatable)."),
    head: str = typer.Option("linear", help="Cell classification head: linear | mlp."),
    scene_column: Optional[str] = typer.Option(None, help="Manifest column with scene labels (e.g. S3_Label) to condition heads on."),
    group_column: Optional[str] = typer.Option(None, "--group", "--group-column",
                                               help="Column whose groups (photographers) are held out together for "
                                               "validation; default AUTHOR/owner when present."),
    gps_gallery: Optional[str] = typer.Option(None, help="Extra GPS gallery points: a CSV with lat/lon, or 'geoclip' for "
                                              "GeoCLIP's 100K points."),
    gallery_init: str = typer.Option("geoclip", help="Location encoder start: geoclip (published weights) | random."),
    gallery_points: int = typer.Option(100_000, help="Most GPS gallery points from the photos' distinct places (a "
                                       "uniform sample above; GeoCLIP's gallery is 100K)."),
    gallery_epochs: Optional[int] = typer.Option(None, help="Most training rounds of the GPS gallery (default 40; early "
                                                       "stopping usually ends sooner). A round is a pass over the "
                                                       "photos, or 10,000 of them in bigger galleries."),
    gallery_round_photos: int = typer.Option(10_000, help="Photos per GPS-gallery training round: the training "
                                             "budget is rounds x this. Twice the default gains ~6 points at 25 km "
                                             "in --mode gallery on the 100K benchmark, at up to twice the time."),
    train_photos: int = typer.Option(200_000, help="Most photos the trained stages (cell heads, location encoder) "
                                     "hold in memory: above, a seeded sample of the gallery; partitions, cell "
                                     "counts, gallery points and the kNN index still use every photo."),
    skip: list[str] = typer.Option([], help="Stages to leave out: cells, gallery, fusion (repeatable)."),
    force: list[str] = typer.Option([], help="Stages to rebuild although built: knn_index, cells, gallery, fusion."),
    memory: Optional[str] = typer.Option(None, help="Memory the build may use at its peak, e.g. 16GB (default: 70% of "
                                         "this machine); a build that cannot fit is refused before it starts."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what each stage would build and need (memory, disk) "
                                 "from the input's size, and stop."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Run the embedding shards (an actor pool, one model load "
                                      "each, a GPU each when the cluster has them) and FAISS population on a Ray "
                                      "cluster: 'local' starts one here (or joins RAY_ADDRESS), else the cluster's "
                                      "address. --out must be on storage every node mounts. pip install \"geo[ray]\"."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars and no stage lines: only the result."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also each training epoch's metrics (cell heads, "
                                 "GPS gallery), as lines."),
) -> None:
    """Build an index bundle from geotagged photos or their precomputed embeddings (resumable: re-run the same
    command after an interruption).

    \b
      geo build-index photos.csv --image-root photos/ --out my-index
      geo build-index ~/Pictures/trips --out my-index                      # EXIF GPS
      geo build-index --embeddings emb.parquet --backbone open_clip:ViT-B-32/openai --group AUTHOR --out my-index
      geo build-index photos.csv --image-root /shared/photos --out /shared/my-index --ray local
    """
    if (manifest is None) == (embeddings is None):
        fail("give a manifest (or a folder of photos), or --embeddings PATH: one of the two")
    unknown = set(skip) - set(SKIPPABLE)
    if unknown:
        fail(f"--skip takes {', '.join(SKIPPABLE)}, not {', '.join(sorted(unknown))}")
    if allow_download:
        allow_downloads()
    if partitioner not in PARTITIONERS:
        fail(f"--partitioner takes {', '.join(PARTITIONERS)}, not {partitioner!r}")
    unknown = set(force) - set(FORCEABLE)
    if unknown:
        fail(f"--force takes {', '.join(FORCEABLE)}, not {', '.join(sorted(unknown))}")
    gallery = GalleryConfig(gps_gallery=gps_gallery, init=gallery_init, device=device, max_points=gallery_points,
                            round_photos=gallery_round_photos,
                            **({"epochs": gallery_epochs} if gallery_epochs is not None else {}))
    cfg = BuildConfig(
        manifest=str(manifest) if manifest else None, out=str(out), image_root=str(image_root) if image_root else None,
        embeddings=str(embeddings) if embeddings else None, embedding_column=embedding_column,
        backbone=backbone, weights=str(weights) if weights else None, device=device, precision=precision,
        embed=EmbedConfig(batch_size=batch_size, workers=workers, shard_rows=shard_size),
        stage_configs=StageConfigs(
            knn=KnnConfig(ram_budget=ram_budget, exact_max=exact_max),
            cells=CellsConfig(cells=[str(c) for c in cells], partitioner=partitioner, tau_min=tau_min,
                              tau_max=list(tau_max), head=head, scene_column=scene_column, device=device),
            gallery=gallery, group_column=group_column, train_photos=train_photos),
        stages=tuple(st for st in STAGES if st not in skip), force=tuple(force),
        **({"memory": parse_bytes(memory)} if memory else {}), ray=ray,
    )
    log = (lambda m: None) if quiet else (lambda m: typer.echo(m, err=True))
    if dry_run:
        dry_run_build(cfg, log=typer.echo)
        return
    with showing(bars=not quiet, verbose=verbose and not quiet):
        bundle = build_index(cfg, log=log, progress=not quiet)
    counts = bundle.manifest.get("counts", {})
    typer.echo(f"built {out}: {counts.get('ok', 0):,} photos indexed, {counts.get('failed', 0):,} failed")
    if bundle.has_stage("fusion") and not quiet:
        typer.echo(learned_summary(FusionParams.from_dict(bundle.stage("fusion")["params"]), PRIOR_ONLY))


def add_command(
    index: Path = typer.Argument(..., help="Bundle directory built by `geo build-index`."),
    manifest: Optional[Path] = typer.Argument(None, help="Photos to add: a manifest or a folder of EXIF-tagged photos."),
    embeddings: Optional[Path] = typer.Option(None, "--embeddings", help="Precomputed embeddings to add (Parquet or "
                                              "clip-retrieval output), made by the bundle's backbone."),
    embedding_column: str = typer.Option("embedding", help="Column of --embeddings Parquet holding the vectors."),
    image_root: Optional[Path] = typer.Option(None, help="Directory that relative image paths start from."),
    refit: bool = typer.Option(False, "--refit", help="Also refit the cell partitions and heads, the GPS gallery's "
                               "model and fusion on all photos (a full build's cost for those stages)."),
    workers: int = typer.Option(-1, help="Decoding processes; -1 = one per core (max 8), 0 = in-process."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars and no stage lines: only the result."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also each training epoch's metrics (cell heads, "
                                 "GPS gallery), as lines."),
) -> None:
    """Append photos to a bundle: new shards, FAISS add, cell counts and support spots, gallery points.

    Heads, the gallery's model and fusion stay as fitted (`geo info` says they are stale) unless --refit.

    \b
      geo add my-index new-photos.csv --image-root new/
      geo add my-index --embeddings more.parquet --refit
    """
    if (manifest is None) == (embeddings is None):
        fail("give a manifest (or a folder of photos), or --embeddings PATH: one of the two")
    log = (lambda m: None) if quiet else (lambda m: typer.echo(m, err=True))
    with showing(bars=not quiet, verbose=verbose and not quiet):
        bundle = add_photos(index, str(manifest) if manifest else None, str(embeddings) if embeddings else None,
                            str(image_root) if image_root else None, embedding_column, refit,
                            EmbedConfig(workers=workers), log=log, progress=not quiet)
    counts = bundle.manifest.get("counts", {})
    typer.echo(f"added to {index}: {counts.get('ok', 0):,} photos indexed in all, {counts.get('failed', 0):,} failed")


def register(app: typer.Typer) -> None:
    app.command("build-index")(build_index_command)
    app.command("add")(add_command)
