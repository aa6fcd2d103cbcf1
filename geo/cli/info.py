"""``geo info`` (what a bundle holds, verified) and ``geo backbones`` (the image models a bundle can use)."""
from __future__ import annotations

from pathlib import Path

import typer

from geo.cli.common import print_json
from geo.cli.options import Json
from geo.core.geodesy import THRESHOLDS_KM
from geo.core.sizes import human_bytes
from geo.models.backbones import available_backbones
from geo.settings import non_default, recorded
from geo.store.bundle import open_bundle


def _stage_line(stage: str, info: dict) -> str:
    """The few numbers a person reads first; the whole record is in --json."""
    keys = {"embeddings": ("ok", "failed", "shards", "images_per_s"),
            "knn_index": ("factory", "ntotal", "nprobe", "recall@10", "median_query_ms"),
            "cells": ("source", "partitions", "cells", "photos", "support_spots", "city_head"),
            "gallery": ("n_points", "dim", "best_epoch"),
            "fusion": ("validation",)}.get(stage, ())
    parts = []
    for k in keys:
        v = info.get(k)
        if v is None:
            continue
        if k == "city_head":
            v = (f"{v['cities']} cities, held-out top-1 {100 * v['held_out_acc']:.1f}% (majority class "
                 f"{100 * v['majority_acc']:.1f}%)") if "held_out_acc" in v else f"{v['cities']} cities"
            v += f"; not used: {info[k]['not_used_because']}" if info[k].get("not_used_because") else ""
        if k == "validation":
            v = " ".join(f"{t}km {100 * v[t]:.1f}%" for t in map(str, THRESHOLDS_KM) if t in v)
            k = "out-of-fold accuracy"
        parts.append(f"{k} {v}")
    if "stage_seconds" in info:
        parts.append(f"built in {info['stage_seconds']:g} s")
    return f"  {stage}: " + ", ".join(map(str, parts))


def _settings_line(record: dict) -> str:
    if not record:
        return "  settings: not recorded (built before geo recorded them; a refit uses the defaults)"
    changed = non_default(record)
    if isinstance(changed.get("knn.ram_budget"), int):  # derived from --memory: bytes, for people
        changed["knn.ram_budget"] = human_bytes(changed["knn.ram_budget"])
    shown = ", ".join(f"{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in changed.items())
    return f"  settings: {shown or 'the defaults'} (every other setting at its default; --json shows all)"


def info_command(index: Path = typer.Argument(..., help="Bundle directory."),
                 verify: bool = typer.Option(False, "--verify", help="Also check every file's sha256 against the "
                                             "manifest (reads the whole bundle; sizes are always checked)."),
                 as_json: Json = False) -> None:
    """Show what a bundle holds (backbone, counts, stages, the settings it was built with) after checking its
    files. --json prints the settings in the shape `geo build-index --config` reads.

    \b
      geo info my-index --verify
      geo info my-index --json | jq .build.settings > settings.json   # then: geo build-index --config settings.json
    """
    b = open_bundle(index, hashes=verify)
    m = b.summary(sha256_checked=verify)
    checked = f"{len(b.manifest.get('files', {}))} files, " + ("sizes and sha256 verified" if verify else
                                                                "sizes checked (--verify also checks sha256)")
    if as_json:
        print_json(m)
        if m["unfinished"]:
            raise typer.Exit(2)
        return
    typer.echo(f"{index}: geo bundle format {m['format_version']}, backbone {m['backbone']['name']} ({m['dim']}-d)")
    counts = m.get("counts", {})
    typer.echo(f"  photos: {counts.get('ok', 0):,} indexed, {counts.get('failed', 0):,} failed")
    for stage, info in m.get("stages", {}).items():
        if stage != "errors":
            typer.echo(_stage_line(stage, info or {}))
    typer.echo(_settings_line(recorded(b.manifest)))
    stale = b.manifest.get("stale")
    if stale:
        typer.echo(f"  stale: {', '.join(stale['what'])} were fitted before {stale['photos_added']:,} photos were "
                   "added; their kNN, cell counts and gallery points are current (geo add --refit, or geo "
                   "build-index --force cells --force gallery --force fusion, refits them)")
    typer.echo(f"  {checked}")
    if m["unlisted"]:
        shown = ", ".join(m["unlisted"][:5]) + (f" and {len(m['unlisted']) - 5} more" if len(m["unlisted"]) > 5 else "")
        typer.echo(f"  not part of the bundle (the manifest does not list them; nothing reads them): {shown}")
    if m["unfinished"]:
        b.require_complete()


def backbones_command() -> None:
    """List the image models a bundle can be built with (`geo build-index --backbone NAME`)."""
    for line in available_backbones():
        typer.echo(line)


def register(app: typer.Typer) -> None:
    app.command("info")(info_command)
    app.command("backbones")(backbones_command)
