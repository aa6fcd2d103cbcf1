"""What every command shares: one way to fail with a clear line, one way to print JSON."""
from __future__ import annotations

import json
from typing import Any, NoReturn

import typer

from geo.eval.report import json_safe


def fail(message: object) -> NoReturn:
    """One line on stderr naming the file and the reason, exit code 2 (bad input)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def print_json(obj: Any, indent: int | None = 2) -> None:
    typer.echo(json.dumps(json_safe(obj), indent=indent, default=str))
