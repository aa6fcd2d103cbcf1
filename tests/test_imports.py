"""The package has no import circles and imports its own modules only at the top of a module.

Every module is imported first and alone in an interpreter where no geo module
is loaded yet (an import circle breaks exactly there), the whole package is
imported in shuffled orders, and the source is read for imports of ``geo``
inside function bodies (allowed only for optional extras, listed by module).
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
import duckdb, matplotlib, geographiclib.geodesic
assert not any(m == "geo" or m.startswith("geo.") for m in sys.modules)
bad = []
for module in sys.argv[1:]:
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
    with os.fdopen(read, "rb") as f:
        err = f.read().decode()
    if os.waitpid(pid, 0)[1] != 0:
        bad.append(module + ":\\n" + err)
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
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
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
