"""The command line stays small and every option says what it is for (issue 23: shared options, tuned
constants as data behind --config)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import typer

from geo.cli import app

_spec = importlib.util.spec_from_file_location("surface", Path(__file__).resolve().parents[1] / "scripts" / "surface.py")
surface = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(surface)


def test_option_budget():
    opts = surface.command_options()
    assert len(opts["geo build-index"]) <= 20, opts["geo build-index"]
    # geo serve and geo finetune have budgets of their own (8 and 10): the rest share 72
    rest = {k: v for k, v in opts.items() if k not in ("geo serve", "geo finetune")}
    assert sum(map(len, rest.values())) <= 72, rest


def test_shared_options_read_the_same_everywhere():
    root = typer.main.get_command(app)
    helps: dict[str, set[str]] = {}

    def walk(cmd):
        for name, sub in getattr(cmd, "commands", {}).items():
            if name not in ("serve", "finetune"):  # their own modules, which may adopt geo.cli.options later
                walk(sub)
        for p in cmd.params:
            if getattr(p, "param_type_name", "") == "option" and p.name != "help":
                assert p.help, f"{cmd.name} {p.opts[0]} has no help"
                helps.setdefault(p.opts[0], set()).add(p.help)

    walk(root)
    for name in ("--embeddings", "--embedding-column", "--workers", "--quiet", "--index", "--json", "--device"):
        assert len(helps[name]) == 1, (name, helps[name])
