"""``geo build-index``: geotagged photos in, an index bundle out (resumable)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from geo.cli.common import fail
from geo.data.manifest import ManifestError
from geo.pipeline import STAGES, BuildConfig, StageConfigs, build_index
from geo.stages.cells.stage import CellsConfig
from geo.stages.embed import EmbedConfig
from geo.stages.gallery.stage import GalleryConfig
from geo.stages.knn import KnnConfig
from geo.store.bundle import BundleError

SKIPPABLE = ("cells", "gallery", "fusion")
FORCEABLE = ("knn_index", "cells", "gallery", "fusion")


def build_index_command(
    manifest: Path = typer.Argument(..., help="CSV/Parquet with an image column (path, image, IMG_ID, id) and lat/lon "
                                    "columns, or a folder of photos whose EXIF carries GPS."),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle directory to create, or to resume if it exists."),
    image_root: Optional[Path] = typer.Option(None, help="Directory that relative image paths in the manifest start from."),
    backbone: str = typer.Option("efficientnet_lite0", help="Image model; see `geo backbones`."),
    weights: Optional[Path] = typer.Option(None, help="Local weights file for timm:/torchvision: backbones (safetensors or .pth)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    precision: str = typer.Option("auto", help="auto (fp16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16"),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    workers: int = typer.Option(-1, help="Decoding processes; -1 = one per core (max 8), 0 = in-process."),
    shard_size: int = typer.Option(50_000, help="Rows per embedding shard (the unit of resume)."),
    ram_budget: str = typer.Option("8GB", help="Memory the FAISS index may use; picks Flat / IVF-Flat / IVF-PQ."),
    exact_max: int = typer.Option(100_000, help="Largest gallery indexed exactly (IndexFlatIP)."),
    cells: list[Path] = typer.Option([], "--cells", help="Published GeoEstimation cell CSV(s) to assign the gallery to "
                                     "(repeatable, coarse to fine) instead of building adaptive partitions."),
    partitioner: str = typer.Option("adaptive", help="adaptive (PlaNet/Müller-Budack S2 splitting) | bottomup (seed 002 hot spots)."),
    tau_min: Optional[int] = typer.Option(None, help="Drop cells with fewer photos (default scales with gallery size)."),
    tau_max: list[int] = typer.Option([], help="Split cells with more photos; one per partition (repeatable)."),
    head: str = typer.Option("linear", help="Cell classification head: linear | mlp."),
    scene_column: Optional[str] = typer.Option(None, help="Manifest column with scene labels (e.g. S3_Label) to condition heads on."),
    group_column: Optional[str] = typer.Option(None, help="Column whose groups (photographers) are held out together for "
                                               "validation; default AUTHOR/owner when present."),
    gps_gallery: Optional[str] = typer.Option(None, help="Extra GPS gallery points: a CSV with lat/lon, or 'geoclip' for "
                                              "GeoCLIP's 100K points."),
    gallery_init: str = typer.Option("geoclip", help="Location encoder start: geoclip (published weights) | random."),
    gallery_epochs: Optional[int] = typer.Option(None, help="Most training epochs of the GPS gallery (default 40; early "
                                                       "stopping usually ends sooner). On a 2-core CPU a 100K gallery "
                                                       "takes ~5 min an epoch: see benchmarks/RESULTS.md."),
    skip: list[str] = typer.Option([], help="Stages to leave out: cells, gallery, fusion (repeatable)."),
    force: list[str] = typer.Option([], help="Stages to rebuild although built: knn_index, cells, gallery, fusion."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Build an index bundle from geotagged photos (resumable: re-run the same command after an interruption)."""
    unknown = set(skip) - set(SKIPPABLE)
    if unknown:
        fail(f"--skip takes {', '.join(SKIPPABLE)}, not {', '.join(sorted(unknown))}")
    unknown = set(force) - set(FORCEABLE)
    if unknown:
        fail(f"--force takes {', '.join(FORCEABLE)}, not {', '.join(sorted(unknown))}")
    gallery = GalleryConfig(gps_gallery=gps_gallery, init=gallery_init, device=device,
                            **({"epochs": gallery_epochs} if gallery_epochs is not None else {}))
    cfg = BuildConfig(
        manifest=str(manifest), out=str(out), image_root=str(image_root) if image_root else None,
        backbone=backbone, weights=str(weights) if weights else None, device=device, precision=precision,
        embed=EmbedConfig(batch_size=batch_size, workers=workers, shard_rows=shard_size),
        stage_configs=StageConfigs(
            knn=KnnConfig(ram_budget=ram_budget, exact_max=exact_max),
            cells=CellsConfig(cells=[str(c) for c in cells], partitioner=partitioner, tau_min=tau_min,
                              tau_max=list(tau_max), head=head, scene_column=scene_column, device=device),
            gallery=gallery, group_column=group_column),
        stages=tuple(st for st in STAGES if st not in skip), force=tuple(force),
    )
    log = (lambda m: None) if quiet else (lambda m: typer.echo(m, err=True))
    try:
        bundle = build_index(cfg, log=log, progress=not quiet)
    except (BundleError, ManifestError, FileNotFoundError, ValueError) as e:
        fail(e)
    counts = bundle.manifest.get("counts", {})
    typer.echo(f"built {out}: {counts.get('ok', 0):,} photos indexed, {counts.get('failed', 0):,} failed")


def register(app: typer.Typer) -> None:
    app.command("build-index")(build_index_command)
