"""``geo build-index``: geotagged photos in, an index bundle out (resumable)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import typer

from geo.cli.common import fail
from geo.cli.options import Config, Device, EmbeddingColumn, Embeddings, ImageRoot, Quiet, Verbose, Workers
from geo.core.answer import PRIOR_ONLY
from geo.core.progress import showing
from geo.core.sizes import parse_bytes
from geo.models.hub import allow_downloads
from geo.pipeline import STAGES, BuildConfig, add_photos, build_index
from geo.pipeline import dry_run as dry_run_build
from geo.settings import SKIPPABLE, BuildSettings, layered, read_config, recorded, unapplied
from geo.stages.cells.partition import PARTITIONERS
from geo.stages.fusion.posterior import FusionParams, learned_summary
from geo.store.bundle import MANIFEST, read_json

FORCEABLE = ("knn_index", "cells", "gallery", "fusion")


def _one_of(*values: str):
    """An option callback refusing a value (or a repeated option's value) outside ``values`` in one line."""
    def check(param: typer.CallbackParam, value):
        for v in value if isinstance(value, list) else [value]:
            if v is not None and v not in values:
                fail(f"{param.opts[0]} takes {', '.join(values)}, not {v!r}")
        return value
    return check


def build_index_command(
    manifest: Optional[Path] = typer.Argument(None, help="CSV/Parquet with an image column (path, image, IMG_ID, id) and "
                                              "lat/lon columns, or a folder of photos whose EXIF carries GPS."),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle folder to create; an existing one is resumed (re-run "
                             "the same command after an interruption) with the settings it recorded."),
    embeddings: Embeddings = None,
    embedding_column: EmbeddingColumn = "embedding",
    image_root: ImageRoot = None,
    backbone: str = typer.Option("efficientnet_lite0", help="The image model (`geo backbones` lists them): a "
                                 "CLIP or GeoCLIP model answers far better than the small default on a GPU."),
    weights: Optional[Path] = typer.Option(None, help="Give for timm:/torchvision: backbones whose weights are a "
                                           "local file (safetensors or .pth), e.g. a fine-tuned one."),
    allow_download: bool = typer.Option(False, "--allow-download", help="Let open_clip/GeoCLIP backbones fetch "
                                        "their weights from the Hugging Face hub once. Without it nothing is "
                                        "downloaded: weights must be in the hub cache or a local-dir."),
    device: Device = "auto",
    workers: Workers = None,
    partitioner: Optional[str] = typer.Option(None, callback=_one_of(*PARTITIONERS), help="Cells: adaptive "
                                              "(default: PlaNet S2 splitting), bottomup (hot spots) or semantic "
                                              "(PIGEON: borders, then Voronoi cells where photos cluster; best "
                                              "with a gallery of 100K+ photos)."),
    head: Optional[str] = typer.Option(None, callback=_one_of("linear", "mlp"), help="Cell classifier: linear "
                                       "(default) or mlp, which may gain on galleries of 100K+ photos."),
    group: Optional[str] = typer.Option(None, "--group", "--group-column", help="Give when the photographer "
                                        "column is not AUTHOR/owner/...: its groups are held out together, "
                                        "so validation scores places, not photographers' habits."),
    skip: list[str] = typer.Option([], callback=_one_of(*SKIPPABLE), help="Leave out a stage (repeatable): "
                                   "for a fast kNN-only bundle, or to save time on a large gallery."),
    force: list[str] = typer.Option([], callback=_one_of(*FORCEABLE), help="Rebuild a built stage (repeatable), "
                                    "e.g. after changing its settings; its dependants are re-tuned."),
    memory: Optional[str] = typer.Option(None, help="The build's peak memory, e.g. 16GB (default: 70% of this "
                                         "machine); the FAISS index may take half. A build that cannot fit is "
                                         "refused before it starts. Lower it on a shared machine."),
    config: Config = None,
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what each stage would build and need (memory, "
                                 "disk) from the input's size, and stop: before a long build."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Embed shards and fill FAISS on a Ray cluster: 'local' "
                                      "(RAY_ADDRESS's cluster, else one `ray start` made here, else a new one here), "
                                      "HOST:PORT (from one of its nodes) or ray://HOST:10001. --out must be on "
                                      "storage every node mounts. pip install \"geo\\[ray]\"."),
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Build an index bundle from geotagged photos or their precomputed embeddings (resumable: re-run the same
    command after an interruption). Every setting is recorded in the bundle (`geo info` shows them); a
    resumed build, --force STAGE and `geo add --refit` reuse them unless an option says otherwise.

    \b
      geo build-index photos.csv --image-root photos/ --out my-index
      geo build-index ~/Pictures/trips --out my-index                      # EXIF GPS
      geo build-index --embeddings emb.parquet --backbone open_clip:ViT-B-32/openai --group AUTHOR --out my-index
      geo build-index photos.csv --out my-index --head mlp --skip fusion --config tuned.toml
      geo build-index --out my-index --embeddings emb.parquet --force cells --partitioner semantic
      geo build-index photos.csv --image-root /shared/photos --out /shared/my-index --ray local
    """
    if (manifest is None) == (embeddings is None):
        fail("give a manifest (or a folder of photos), or --embeddings PATH: one of the two")
    if allow_download:
        allow_downloads()
    settings = build_settings(out, config, explicit_settings(partitioner=partitioner, head=head, group=group,
                                                             skip=skip, workers=workers, device=device,
                                                             memory=memory), force)
    cfg = BuildConfig(
        manifest=str(manifest) if manifest else None, out=str(out), image_root=str(image_root) if image_root else None,
        embeddings=str(embeddings) if embeddings else None, embedding_column=embedding_column,
        backbone=backbone, weights=str(weights) if weights else None, device=device, precision=settings.precision,
        embed=settings.embed, stage_configs=settings.stages, stages=settings.stage_names(STAGES), force=tuple(force),
        **({"memory": parse_bytes(memory)} if memory else {}), ray=ray,
    )
    if dry_run:
        dry_run_build(cfg, log=typer.echo)
        return
    with showing(bars=not quiet, verbose=verbose and not quiet):
        bundle = build_index(cfg, log=_log(quiet), progress=not quiet)
    counts = bundle.manifest.get("counts", {})
    typer.echo(f"built {out}: {counts.get('ok', 0):,} photos indexed, {counts.get('failed', 0):,} failed")
    if bundle.has_stage("fusion") and not quiet:
        typer.echo(learned_summary(FusionParams.from_dict(bundle.stage("fusion")["params"]), PRIOR_ONLY))


def explicit_settings(partitioner: str | None, head: str | None, group: str | None, skip: list[str],
                      workers: int | None, device: str, memory: str | None) -> dict[str, Any]:
    """The build settings the command line gives explicitly, in the settings' JSON form: an option left at
    its default is absent, so the bundle's record or --config decides it. An explicit --memory re-derives
    the FAISS index's budget from it."""
    out: dict[str, Any] = {"cells": {}, "gallery": {}, "embed": {}, "knn": {}}
    if partitioner is not None:
        out["cells"]["partitioner"] = partitioner
    if head is not None:
        out["cells"]["head"] = head
    if group is not None:
        out["group_column"] = group
    if skip:
        out["skip"] = skip
    if workers is not None:
        out["embed"]["workers"] = workers
    if device != "auto":
        out["cells"]["device"] = out["gallery"]["device"] = device
    if memory is not None:
        out["knn"]["ram_budget"] = None
    return out


def build_settings(out: Path, config: Path | None, explicit: dict[str, Any], force: list[str]) -> BuildSettings:
    """This run's settings: defaults < what the bundle at ``out`` recorded < ``config`` < ``explicit``; a
    stage named by --force is built even where the record skipped it."""
    manifest = read_json(out / MANIFEST) if (out / MANIFEST).is_file() else {}
    record = recorded(manifest)
    settings = layered(record, read_config(config) if config else {}, explicit)
    changed = unapplied(record, settings, manifest.get("stages", {}), force)
    if changed:
        fail(f"{out}: built with other settings than these: {'; '.join(changed)}. Add --force for the stages "
             "named to rebuild them with the new settings, or leave the options out to resume as recorded")
    return dataclasses.replace(settings, skip=tuple(s for s in settings.skip if s not in force))


def _log(quiet: bool):
    return (lambda m: None) if quiet else (lambda m: typer.echo(m, err=True))


def add_command(
    index: Path = typer.Argument(..., help="Bundle folder built by `geo build-index`."),
    manifest: Optional[Path] = typer.Argument(None, help="Photos to add: a manifest or a folder of EXIF-tagged photos."),
    embeddings: Embeddings = None,
    embedding_column: EmbeddingColumn = "embedding",
    image_root: ImageRoot = None,
    refit: bool = typer.Option(False, "--refit", help="Also refit the cells, the GPS gallery's model and fusion on "
                               "all photos, with the settings the bundle recorded (a full build's cost for those "
                               "stages): once the added photos are many, or cover new places."),
    workers: Workers = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Append photos to a bundle: new shards, FAISS add, cell counts and support spots, gallery points.

    Heads, the gallery's model and fusion stay as fitted (`geo info` says they are stale) unless --refit.

    \b
      geo add my-index new-photos.csv --image-root new/
      geo add my-index --embeddings more.parquet --refit
    """
    if (manifest is None) == (embeddings is None):
        fail("give a manifest (or a folder of photos), or --embeddings PATH: one of the two")
    settings = build_settings(index, None, explicit_settings(None, None, None, [], workers, "auto", None), [])
    with showing(bars=not quiet, verbose=verbose and not quiet):
        bundle = add_photos(index, str(manifest) if manifest else None, str(embeddings) if embeddings else None,
                            str(image_root) if image_root else None, embedding_column, refit, settings.embed,
                            log=_log(quiet), progress=not quiet)
    counts = bundle.manifest.get("counts", {})
    typer.echo(f"added to {index}: {counts.get('ok', 0):,} photos indexed in all, {counts.get('failed', 0):,} failed")


def register(app: typer.Typer) -> None:
    app.command("build-index")(build_index_command)
    app.command("add")(add_command)
