"""The options several commands share, declared once, so they read and behave the same everywhere.

Each is a type alias for a parameter (``embeddings: Embeddings = None``); its help says when to use it. A
command that needs a different default declares its own option rather than bending these.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Index = Annotated[Optional[Path], typer.Option(
    "--index", "-i", help="The bundle to answer from: the --out folder of `geo build-index`.")]

Embeddings = Annotated[Optional[Path], typer.Option(
    "--embeddings", help="Use when the photos are already embedded (e.g. by clip-retrieval): a Parquet file or "
    "folder with an embedding column (and lat/lon where truth is needed; id, photographer and other columns "
    "are kept), or clip-retrieval output (img_emb/*.npy + metadata/*.parquet). No image model runs; the "
    "vectors must come from the bundle's backbone (for build-index: name it with --backbone).")]

EmbeddingColumn = Annotated[str, typer.Option(
    "--embedding-column", help="Change when the --embeddings Parquet keeps its vectors in another column.")]

ImageRoot = Annotated[Optional[Path], typer.Option(
    "--image-root", help="Give when the manifest's image paths are relative to a folder other than the "
    "current one.")]

Workers = Annotated[Optional[int], typer.Option(
    "--workers", help="Image-decoding processes (default: one per core, at most 8). 0 decodes in-process: "
    "use it when worker processes cannot start (some containers, debuggers).")]

Device = Annotated[str, typer.Option(
    "--device", help="auto (a GPU when there is one) | cpu | cuda. Say cpu to keep a busy GPU free.")]

Quiet = Annotated[bool, typer.Option(
    "--quiet", "-q", help="No progress bars and no stage lines, only the result: for scripts and logs.")]

Verbose = Annotated[bool, typer.Option(
    "--verbose", "-v", help="Also print each training epoch's metrics (cell heads, GPS gallery): to see why a "
    "stage stopped where it did.")]

Json = Annotated[bool, typer.Option(
    "--json", help="JSON instead of lines for people, for scripts and jq (geo query: one object per photo and line; "
    "geo sql: the rows as a list).")]

Ci = Annotated[bool, typer.Option(
    "--ci/--no-ci", help="Bootstrap 95% intervals (1000 seeded draws); --no-ci is faster on large files.")]

Distance = Annotated[str, typer.Option(
    "--distance", help="haversine (R=6371.0 km, as GeoEstimation and published results) or geodesic (WGS84, "
    "for exact metres).")]

Config = Annotated[Optional[Path], typer.Option(
    "--config", help="Every other build setting, from a JSON or TOML file in the shape `geo info --json` "
    "prints under build.settings (e.g. {\"cells\": {\"tau_max\": [2000, 500]}, \"gallery\": {\"epochs\": 20}}). "
    "Use it to tune a stage or to copy another bundle's settings; explicit options win over it.")]
