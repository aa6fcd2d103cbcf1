"""The ``geo`` command: a thin layer over the pipeline, the query side and evaluation; one module per command group."""
from __future__ import annotations

import typer

from geo.cli import bench, build, export, finetune, info, query, serve
from geo.cli.common import GeoGroup, set_debug
from geo.core.files import max_bytes

app = typer.Typer(
    help=(
        "Tell where a photo was taken, from a feature index of geotagged photos.\n\n"
        "  geo build-index photos.csv --out my-index      # embeddings, FAISS, cells, GPS gallery, fusion\n\n"
        "  geo query holiday.jpg --index my-index          # coordinates, confidence, evidence\n\n"
        "  geo info my-index --verify                      # what a bundle holds, every file's sha256 checked\n\n"
        "  geo serve --index my-index                      # HTTP API and a map page on http://127.0.0.1:8000/\n\n"
        "  geo finetune photos.csv --out my-model          # teach the backbone places; then --backbone my-model\n\n"
        "  geo export my-index vectors/                    # the embeddings out again (Parquet or clip-retrieval)\n\n"
        "Nothing is fetched or uploaded: models and photos stay on this machine."
    ),
    no_args_is_help=True,
    add_completion=False,  # --install-completion/--show-completion: a one-time setup on every help page
    pretty_exceptions_show_locals=False,
    cls=GeoGroup,
)


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show the traceback of a failure instead of one "
                                        "line (also GEO_DEBUG=1); give it before the command: geo --debug query ...")
             ) -> None:
    set_debug(debug)
    max_bytes()  # a malformed GEO_MAX_FILE_BYTES is one error up front, not one per file


for group in (build, query, info, export, bench, serve, finetune):
    group.register(app)

__all__ = ["app"]
