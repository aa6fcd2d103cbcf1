"""The package's imports point down its documented layers, make no circles, and sit at the top of a module.

The layer table below is the one copy of docs/ARCHITECTURE.md's order; every import of a geo module,
at the top of a module or inside a function, absolute or relative, is read from the source and checked
against it. Every module is also imported first and alone in an interpreter where no geo module is
loaded yet (an import circle breaks exactly there), the whole package is imported in shuffled orders,
and imports of ``geo`` inside function bodies are refused (optional extras excepted, listed by module).
"""
from __future__ import annotations

import ast
import random
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "geo"
MODULES = sorted(
    ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    for p in PACKAGE.rglob("*.py")
)
# The documented order, lowest first (docs/ARCHITECTURE.md mirrors it): a module may import its own layer and the
# layers below it, never one above. The top-level modules are the pipeline's level: they drive stages, and eval,
# serve and the CLI drive them. The root package `geo` is the public facade (it resolves open_index lazily): it is
# above every layer, so no module imports it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("geo.core",),
    ("geo.data",),
    ("geo.store",),
    ("geo.models",),
    ("geo.stages",),
    ("geo.pipeline", "geo.plan", "geo.cluster", "geo.executors", "geo.finetune", "geo.settings", "geo.query"),
    ("geo.eval",),
    ("geo.serve", "geo.cli"),
)
FACADE = "geo"


def layer(module: str) -> int:
    """The layer of a geo module: that of its longest listed prefix. A module the table misses is an error, so a
    new top-level module or package gets placed in the order deliberately."""
    if module == FACADE:
        return len(LAYERS)
    best = max((p for level in LAYERS for p in level if module == p or module.startswith(p + ".")), key=len,
               default=None)
    if best is None:
        raise KeyError(f"{module} is in no layer of LAYERS (tests/test_imports.py): place it in the order")
    return next(i for i, level in enumerate(LAYERS) if best in level)


def imported_modules(module: str, source: str, is_package: bool = False) -> list[tuple[str, int]]:
    """(geo module imported, line) for every import in ``source`` (module ``module``), at any depth: top level,
    function bodies, ``if TYPE_CHECKING:`` blocks; relative imports resolved against the module's package."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)]
            names = [".".join(base + ([node.module] if node.module else []))]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        found += [(n, node.lineno) for n in names if n == "geo" or n.startswith("geo.")]
    return found


def upward_imports(module: str, imports: list[tuple[str, int]]) -> list[str]:
    """The imports of ``module`` that point up the layers, one line each."""
    def named(module: str) -> str:
        return f"{module} (layer {layer(module)}: {' / '.join(LAYERS[layer(module)]) if module != FACADE else 'facade'})"

    return [f"{module}:{line} imports {named(name)}, above {named(module)}" for name, line in imports
            if layer(name) > layer(module)]


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


# Optional extras may be imported lazily (ray, fastapi, GPU-only code): `geo serve` loads the server modules
# (FastAPI, uvicorn: the geo[server] extra) only when it runs, so `geo --help` works without them.
LAZY_ALLOWED: dict[str, set[str]] = {"geo.cli.serve": {"geo.serve.app"}}

# Runs in a separate interpreter: the heavy third-party libraries are loaded once, then each geo module is
# imported in a forked child where no geo module is loaded: a fresh interpreter as far as geo is concerned,
# without 50-odd torch imports.
_EACH_ALONE = """
import importlib, os, sys, traceback
import numpy, pandas, pyarrow, pyarrow.parquet, pyarrow.compute, torch, torchvision, faiss, typer, PIL, timm
import open_clip, sklearn.neighbors, sklearn.isotonic, scipy.sparse, safetensors.torch, s2sphere, tqdm.auto
import duckdb, matplotlib, geographiclib.geodesic, shapely, threadpoolctl, simplejpeg
import fastapi, starlette, uvicorn, httpx, prometheus_client  # the server's: 0.7-0.9 s in each serve module's child
assert not any(m == "geo" or m.startswith("geo.") for m in sys.modules)


def start(module):  # a child that imports the module first and alone, and a pipe for its traceback
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(module)
            os._exit(0)
        except BaseException:
            os.write(write, traceback.format_exc().encode()[-3000:])
            os._exit(1)
    os.close(write)
    return module, pid, read


def failure(module, pid, read):
    with os.fdopen(read, "rb") as f:
        err = f.read().decode()
    return module + ":\\n" + err if os.waitpid(pid, 0)[1] != 0 else None


running, bad = [], []
for module in sys.argv[1:]:  # one child per core at a time
    if len(running) >= (os.cpu_count() or 1):
        bad.append(failure(*running.pop(0)))
    running.append(start(module))
bad = [b for b in bad + [failure(*r) for r in running] if b]
print("\\n\\n".join(bad))
sys.exit(1 if bad else 0)
"""


def test_every_module_is_listed():
    assert "geo.core.geodesy" in MODULES and "geo.cli" in MODULES and len(MODULES) > 40


def test_each_module_imports_first_and_alone():
    r = subprocess.run([sys.executable, "-c", _EACH_ALONE, *MODULES], capture_output=True, text=True, timeout=600,
                       cwd=PACKAGE.parent)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


@pytest.mark.parametrize("seed", [0, 1])
def test_the_whole_package_imports_in_any_order(seed):
    order = random.Random(seed).sample(MODULES, len(MODULES))
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    r = subprocess.run([sys.executable, "-c", code, *order], capture_output=True, text=True, timeout=300,
                       cwd=PACKAGE.parent)
    assert r.returncode == 0, r.stderr[-2000:]


def test_imports_point_down_the_layers():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        offenders += upward_imports(module, imported_modules(module, path.read_text(), path.name == "__init__.py"))
    assert not offenders, "imports pointing up docs/ARCHITECTURE.md's order:\n" + "\n".join(offenders)


def test_the_layer_check_catches_an_upward_import():
    """The checker itself: core importing data (at the top, in a function, relatively) is caught; down and
    sideways are not."""
    source = ("from geo.core.geodesy import haversine_km\n"
              "import geo.data.columns\n"
              "def f():\n"
              "    from geo.store.atomic import atomic_write\n"
              "from ..data import images\n"
              "from . import priors\n")
    imports = imported_modules("geo.core.x", source)
    assert sorted(imports) == [("geo.core", 6), ("geo.core.geodesy", 1), ("geo.data", 5), ("geo.data.columns", 2),
                               ("geo.store.atomic", 4)]
    bad = upward_imports("geo.core.x", imports)
    assert sorted(b.split(" imports ")[1].split(" ")[0] for b in bad) == ["geo.data", "geo.data.columns",
                                                                         "geo.store.atomic"], bad
    assert upward_imports("geo.pipeline", [("geo.query.index", 1), ("geo.stages.knn", 2), ("geo.settings", 3)]) == []
    assert upward_imports("geo.query.index", [("geo.eval.runner", 7)]) == [
        "geo.query.index:7 imports geo.eval.runner (layer 6: geo.eval), above geo.query.index "
        f"(layer 5: {' / '.join(LAYERS[5])})"]
    assert upward_imports("geo.stages.cells.stage", [("geo", 3)])  # the facade is above everything
    with pytest.raises(KeyError, match="geo.newthing"):
        layer("geo.newthing")


def test_the_layer_table_matches_architecture_md():
    """docs/ARCHITECTURE.md states the same order in its Rules line."""
    doc = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text()
    order = " → ".join(" / ".join(p.removeprefix("geo.") for p in level) for level in LAYERS)
    assert order in doc, order


def test_light_modules_import_without_torch():
    """Pure helpers and the bundle format must not drag the models in."""
    for m in ("geo", "geo.core.geodesy", "geo.core.splits", "geo.core.s2", "geo.core.priors", "geo.core.answer",
              "geo.data.columns", "geo.store.bundle", "geo.store.atomic"):
        r = subprocess.run([sys.executable, "-c", f"import {m}, sys; assert 'torch' not in sys.modules, 'torch'"],
                           capture_output=True, text=True, timeout=120, cwd=PACKAGE.parent)
        assert r.returncode == 0, f"{m}: {r.stderr[-800:]}"


def test_no_package_import_inside_a_function_body():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    if (name == "geo" or name.startswith("geo.")) and name not in LAZY_ALLOWED.get(module, set()):
                        offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {fn.name}() imports {name}")
    assert not offenders, "\n".join(offenders)
