"""What every command shares: one exception boundary, one way to fail with a clear line, one way to print JSON.

The boundary (:class:`GeoGroup`) turns any exception a command lets through into one line on stderr: the
file and the reason, exit code 2 for bad input and 1 for anything else. ``geo --debug COMMAND`` (or
``GEO_DEBUG=1``) lets the traceback through instead.
"""
from __future__ import annotations

import json
import os
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup
from typer.exceptions import Abort, Exit, TyperException

from geo.cluster import ClusterError
from geo.core.files import FileRefused
from geo.core.plain import json_safe
from geo.data.embedding_table import EmbeddingTableError
from geo.data.images import ImageLoadError
from geo.data.manifest import ManifestError
from geo.eval.sql import SqlError
from geo.eval.suites import SuiteError
from geo.models.registry import BackboneError
from geo.query.client import ServerError
from geo.store.atomic import DiskSpaceError, disk_full
from geo.store.bundle import BundleError
from geo.store.lock import BundleLocked
from geo.store.predictions import PredictionsError

# What a user can fix by changing the input: exit code 2.
BAD_INPUT: tuple[type[Exception], ...] = (
    BundleError, ManifestError, EmbeddingTableError, BackboneError, FileRefused, ImageLoadError, SuiteError,
    PredictionsError, SqlError, ServerError, ClusterError, ValueError, FileNotFoundError, IsADirectoryError,
    NotADirectoryError, PermissionError)
_debug = False


def set_debug(on: bool) -> None:
    global _debug
    _debug = on


def debugging() -> bool:
    return _debug or os.environ.get("GEO_DEBUG", "") not in ("", "0")


def describe(e: BaseException) -> tuple[int, str]:
    """(exit code, one line) for an exception that reached the boundary."""
    if isinstance(e, KeyboardInterrupt):
        return 130, "interrupted; re-run the same command to resume (finished shards and stages are kept)"
    if isinstance(e, DiskSpaceError):
        return 1, str(e.strerror)
    if disk_full(e):
        where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
        return 1, (f"disk full{where}: free some space and re-run the same command; a build resumes where it "
                   "stopped (finished shards and stages are kept)")
    if isinstance(e, BundleLocked):
        return 1, str(e)
    if isinstance(e, BAD_INPUT):
        return 2, str(e) or type(e).__name__
    first = str(e).splitlines()[0] if str(e) else ""
    return 1, f"{type(e).__name__}: {first} (an unexpected failure: `geo --debug ...` shows the traceback)"


class GeoGroup(TyperGroup):
    """The ``geo`` command group, with the CLI's one exception boundary around every command."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (Exit, Abort, TyperException):  # typer's own exits and usage errors
            raise
        except (Exception, KeyboardInterrupt) as e:
            if debugging():
                raise
            code, line = describe(e)
            typer.secho(f"error: {line}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code) from None


def fail(message: object) -> NoReturn:
    """One line on stderr naming the file and the reason, exit code 2 (bad input)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def print_json(obj: Any, indent: int | None = 2) -> None:
    typer.echo(json.dumps(json_safe(obj), indent=indent, default=str))
