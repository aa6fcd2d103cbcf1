"""The `geo` command: a thin layer over geo.index_build and geo.retrieval."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    help=(
        "Tell where a photo was taken, from a feature index of geotagged photos.\n\n"
        "  geo build-index photos.csv --out my-index      # embeddings, FAISS, cells, GPS gallery\n\n"
        "  geo query holiday.jpg --index my-index          # coordinates, confidence, evidence\n\n"
        "Nothing is fetched or uploaded: models and photos stay on this machine."
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command("build-index")
def build_index_cmd(
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
    from geo.bundle import BundleError
    from geo.index_build.embed import EmbedConfig
    from geo.index_build.manifest import ManifestError
    from geo.index_build.runner import BuildConfig, build_index

    cfg = BuildConfig(
        manifest=str(manifest), out=str(out), image_root=str(image_root) if image_root else None,
        backbone=backbone, weights=str(weights) if weights else None, device=device, precision=precision,
        embed=EmbedConfig(batch_size=batch_size, workers=workers, shard_rows=shard_size),
        ram_budget=ram_budget, exact_max=exact_max,
        stages=tuple(st for st in BuildConfig.stages if st not in skip), force=tuple(force),
        stage_options={
            "cells": {"cells": [str(c) for c in cells], "partitioner": partitioner, "tau_min": tau_min,
                      "tau_max": list(tau_max), "head": head, "scene_column": scene_column, "group_column": group_column,
                      "device": device},
            "gallery": {"gps_gallery": gps_gallery, "init": gallery_init, "group_column": group_column, "device": device,
                        **({"epochs": gallery_epochs} if gallery_epochs is not None else {})},
            "fusion": {"group": group_column},
        },
    )
    unknown = set(skip) - {"cells", "gallery", "fusion"}
    if unknown:
        _fail(f"--skip takes cells, gallery or fusion, not {', '.join(sorted(unknown))}")
    log = (lambda m: None) if quiet else (lambda m: typer.echo(m, err=True))
    try:
        bundle = build_index(cfg, log=log, progress=not quiet)
    except (BundleError, ManifestError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    counts = bundle.manifest.get("counts", {})
    typer.echo(f"built {out}: {counts.get('ok', 0):,} photos indexed, {counts.get('failed', 0):,} failed")


def _print_human(ans: dict, top: int = 3) -> None:
    if ans.get("error"):
        typer.echo(f"{ans['image']}: could not read ({ans['error']})")
        return
    if ans.get("abstained"):
        typer.echo(f"{ans['image']}: abstained (confidence {ans['confidence']:.2f} below --min-confidence)")
        return
    typer.echo(f"{ans['image']}: {ans['lat']:.5f}, {ans['lon']:.5f}  [{ans['mode']}]  "
               f"confidence {ans['confidence']:.2f} within {ans['confidence_radius_km'] or 0:g} km")
    for alt in ans.get("alternatives", [])[:3]:
        typer.echo(f"    alternative {alt['lat']:.4f}, {alt['lon']:.4f}  score {alt['score']:.3f}")
    for n in ans.get("neighbors", [])[:top]:
        typer.echo(f"    neighbour {n['id']}  sim {n['similarity']:.3f}  at {n['lat']:.4f}, {n['lon']:.4f}"
                   f"  ({n['distance_km']:.1f} km from answer)")


@app.command("query")
def query_cmd(
    images: list[str] = typer.Argument(..., help="Image files, globs or directories."),
    index: Path = typer.Option(..., "--index", "-i", help="Bundle directory built by `geo build-index`."),
    mode: Optional[str] = typer.Option(None, help="fused (default when built) | knn | gallery | cells"),
    k: int = typer.Option(50, help="Neighbours retrieved from the image index."),
    crops: int = typer.Option(1, help="Test-time crops: 1, 3 (along the long side) or 5 (five-crop)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per image on stdout."),
    out: Optional[Path] = typer.Option(None, help="Also write the answers as predictions Parquet (see geo.predictions)."),
    min_confidence: Optional[float] = typer.Option(None, help="Abstain (no coordinates, abstained=true) when the answer's "
                                                   "confidence is below this."),
) -> None:
    """Locate photos: coordinates, confidence and the neighbour photos that support the answer."""
    from geo import open_index
    from geo.bundle import BundleError

    if crops not in (1, 3, 5):
        _fail("--crops must be 1, 3 or 5")
    try:
        idx = open_index(index, device=device)
        answers = idx.locate(images, mode=mode, k=k, crops=crops)
    except (BundleError, ValueError) as e:
        _fail(str(e))
    answers = answers if isinstance(answers, list) else [answers]
    if min_confidence is not None:
        for a in answers:
            a["abstained"] = bool(a.get("error") is None and (a.get("confidence") or 0.0) < min_confidence)
            if a["abstained"]:
                a["lat"] = a["lon"] = None
    if out is not None:
        from geo.predictions import answers_to_frame, write_predictions

        write_predictions(out, answers_to_frame(answers, mode=mode or idx.default_mode, suite="query",
                                                index_id=str(index)))
    for ans in answers:
        if as_json:
            sys.stdout.write(json.dumps(ans) + "\n")
        else:
            _print_human(ans)
    if all(a.get("error") for a in answers):
        raise typer.Exit(1)


@app.command("info")
def info_cmd(index: Path = typer.Argument(..., help="Bundle directory."),
             as_json: bool = typer.Option(False, "--json")) -> None:
    """Show what a bundle holds (backbone, counts, stages) after verifying its files."""
    from geo.bundle import BundleError, open_bundle

    try:
        b = open_bundle(index)
    except BundleError as e:
        _fail(str(e))
    m = {k: b.manifest[k] for k in ("format_version", "backbone", "dim", "counts", "stages", "software") if k in b.manifest}
    if as_json:
        typer.echo(json.dumps(m, indent=2))
        return
    typer.echo(f"{index}: format {m['format_version']}, backbone {m['backbone']['name']} ({m['dim']}-d)")
    typer.echo(f"  counts: {m.get('counts')}")
    for stage, info in m.get("stages", {}).items():
        typer.echo(f"  {stage}: {json.dumps(info)[:160]}")


@app.command("backbones")
def backbones_cmd() -> None:
    """List the image models a bundle can be built with."""
    from geo.backbones import available_backbones

    for line in available_backbones():
        typer.echo(line)


def _register_subcommands() -> None:
    from geo.bench.cli import register

    register(app)


_register_subcommands()

if __name__ == "__main__":
    app()
