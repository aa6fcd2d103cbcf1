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
    # issue 23 cut 124 options to 87; issues 26 and 27 asked for seven by name (--coverage, --within,
    # --within-weight, --trip, --speed-kmh, --body-timeout-s, geo export --format). Anything more goes to --config.
    assert sum(map(len, opts.values())) <= 94, opts


def test_shared_options_read_the_same_everywhere():
    root = typer.main.get_command(app)
    helps: dict[str, set[str]] = {}

    def walk(cmd):
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub)
        for p in cmd.params:
            if getattr(p, "param_type_name", "") == "option" and p.name != "help":
                assert p.help, f"{cmd.name} {p.opts[0]} has no help"
                # a command whose option means something else declares its own: serve's --index is required,
                # finetune's --device and --json default to its config and print its model card
                if (cmd.name, p.opts[0]) not in {("serve", "--index"), ("finetune", "--device"), ("finetune", "--json")}:
                    helps.setdefault(p.opts[0], set()).add(p.help)

    walk(root)
    for name in ("--embeddings", "--embedding-column", "--workers", "--quiet", "--index", "--json", "--device",
                 "--image-root"):
        assert len(helps[name]) == 1, (name, helps[name])
