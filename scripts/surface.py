"""How large geo's surface is: functions over 80 lines in geo/ and the command-line options of every command.

    python scripts/surface.py            # both counts, with the offenders listed
    python scripts/surface.py --check    # exit 1 when a function is over 80 lines

Options are counted once per command definition (the bench suites share one: same group, same options), ``--help`` not counted.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_LINES = 80
PACKAGE = Path(__file__).resolve().parents[1] / "geo"


def long_functions(limit: int = MAX_LINES) -> list[tuple[int, str]]:
    """(lines, "file:function") of every function in geo/ longer than ``limit`` lines, longest first."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append((lines, f"{path.relative_to(PACKAGE.parent)}:{node.name}"))
    return sorted(found, reverse=True)


def command_options() -> dict[str, list[str]]:
    """Each command's options (``geo bench im2gps3k`` ...), keyed by its name; commands sharing a callback once."""
    import typer

    from geo.cli import app

    root = typer.main.get_command(app)
    seen, out = set(), {}

    def walk(cmd, name: str, ctx) -> None:
        if hasattr(cmd, "list_commands"):
            for sub_name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, sub_name)
                walk(sub, f"{name} {sub_name}", type(ctx)(sub, parent=ctx))
            return
        opts = [p.opts[0] for p in cmd.params if getattr(p, "param_type_name", "") == "option" and p.name != "help"]
        key = (name.rsplit(" ", 1)[0], tuple(opts))  # a group's commands made from one definition count once
        if key in seen:
            return
        seen.add(key)
        out[name] = opts

    ctx = type(root).context_class(root)
    out["geo"] = [p.opts[0] for p in root.params if getattr(p, "param_type_name", "") == "option" and p.name != "help"]
    walk(root, "geo", ctx)
    return out


def main() -> int:
    long = long_functions()
    print(f"functions over {MAX_LINES} lines in geo/: {len(long)}")
    for lines, where in long:
        print(f"  {lines:4d} {where}")
    opts = command_options()
    print(f"command-line options: {sum(map(len, opts.values()))} in all")
    for name, o in opts.items():
        print(f"  {len(o):3d} {name}: {' '.join(o)}")
    return 1 if "--check" in sys.argv and long else 0


if __name__ == "__main__":
    sys.exit(main())
