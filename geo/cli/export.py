"""``geo export``: a bundle's embeddings out, in the forms ``--embeddings`` reads back (the way back out)."""
from __future__ import annotations

from pathlib import Path

import typer

from geo.cli.common import fail
from geo.store.bundle import bundle_containing, open_bundle
from geo.store.export import FORMATS, ExportError, export_embeddings


def export_command(index: Path = typer.Argument(..., help="Bundle directory."),
                   out: Path = typer.Argument(..., help="Folder to write (missing or empty)."),
                   form: str = typer.Option("parquet", "--format", help="parquet (OUT/part-NNNNN.parquet: id, "
                                            "path, lat, lon, the extra columns, embedding) | clip-retrieval "
                                            "(OUT/img_emb/img_emb_N.npy + OUT/metadata/metadata_N.parquet)."),
                   ) -> None:
    """Write a bundle's embeddings and their metadata, the inverse of --embeddings: another tool can index them,
    or a new bundle be built from them without embedding a photo again.

    \b
      geo export my-index vectors/                            # Parquet parts
      geo export my-index clip/ --format clip-retrieval       # img_emb/*.npy + metadata/*.parquet
      geo build-index --embeddings vectors/ --backbone lite0 --out again/
    """
    if form not in FORMATS:
        fail(f"--format must be {' or '.join(FORMATS)}, not {form!r}")
    if (inside := bundle_containing(out)) is not None:
        fail(f"{out} is inside the bundle {inside}: export elsewhere")
    bundle = open_bundle(index)
    try:
        rows, files = export_embeddings(bundle, out, form)
    except ExportError as e:
        fail(e)
    m = bundle.manifest
    typer.echo(f"{out}: {rows:,} embeddings ({m['dim']}-d, backbone {m['backbone']['name']}) in {files} files "
               f"({form})", err=True)


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
