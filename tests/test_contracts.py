"""The contracts docs/CONTRACTS.md states about writing, checked on the source.

- Only ``geo.pipeline`` commits to ``manifest.json``: no other module calls the Bundle methods that rewrite it,
  and no stage touches the manifest at all (a stage returns its files and info; the pipeline commits them).
- Every file geo writes goes through ``geo.store.atomic`` (temp file + rename: an interruption never leaves half
  a file under the final name): no module but atomic.py calls a file writer directly.

Each check is a function over a module's source, so the tests below also show it catching what it is for.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "geo"


def _modules(under: str = "") -> list[tuple[str, str]]:
    """(module name, source) of every module of the package, or of those under ``under`` ("geo/stages")."""
    root = PACKAGE.parent / under if under else PACKAGE
    return [(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"), p.read_text())
            for p in sorted(root.rglob("*.py"))]


def _calls(source: str) -> list[tuple[ast.Call, str]]:
    """Every call in ``source`` with the name of the function it is in ("<module>" at the top)."""
    found: list[tuple[ast.Call, str]] = []

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else where
            if isinstance(child, ast.Call):
                found.append((child, where))
            visit(child, inner)

    visit(ast.parse(source), "<module>")
    return found


def _receiver(call: ast.Call) -> str | None:
    """The plain name a method is called on (``json`` in ``json.dump(...)``), else None."""
    f = call.func
    return f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None


_MODULES = {"os", "json", "pickle", "torch", "np", "numpy", "shutil", "pq", "faiss", "Image"}


def _writer_name(call: ast.Call) -> str:
    """``json.dump`` for a module's function, ``savefig`` for a method on a value."""
    on = _receiver(call)
    return f"{on}.{_called(call)}" if on in _MODULES else str(_called(call))


def _called(call: ast.Call) -> str | None:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


# ---------------------------------------------------------------- manifest.json
MANIFEST_OWNERS = {"geo.pipeline", "geo.store.bundle"}  # the one committer, and the module that defines the writers
_MUTATORS = {"setdefault", "update", "pop", "popitem", "clear", "append", "extend", "insert", "remove",
             "__setitem__", "__delitem__"}


def manifest_writers() -> set[str]:
    """The Bundle methods that rewrite manifest.json, read from geo/store/bundle.py: ``save`` and every method
    that calls one of them (so a new writer there is covered without editing this test)."""
    tree = ast.parse((PACKAGE / "store" / "bundle.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Bundle")
    methods = {m.name: m for m in cls.body if isinstance(m, ast.FunctionDef)}
    writers = {"save"}
    while True:
        more = {name for name, m in methods.items() if name not in writers and any(
            isinstance(c, ast.Call) and _called(c) in writers for c in ast.walk(m))}
        if not more:
            return writers
        writers |= more


def _through_manifest(node: ast.AST) -> bool:
    """``node`` is reached through a ``.manifest`` attribute (``b.manifest["x"]``, ``b.manifest.setdefault(..)[k]``)."""
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        if isinstance(node, ast.Attribute) and node.attr == "manifest":
            return True
        node = node.func if isinstance(node, ast.Call) else node.value
    return False


def manifest_commits(source: str, writers: set[str]) -> list[str]:
    """Calls of the Bundle's manifest writers. ``save`` counts only without arguments: an artifact's
    ``save(bundle)`` writes its own files."""
    return [f"{c.lineno}: {where}() calls .{_called(c)}()" for c, where in _calls(source)
            if _called(c) in writers and (_called(c) != "save" or not (c.args or c.keywords))]


def manifest_touches(source: str) -> list[str]:
    """Changes to a bundle's manifest in memory (what the next commit would write), and any use of its file name;
    one finding a line."""
    found: dict[int, str] = {}
    for node in ast.walk(ast.parse(source)):
        targets = (node.targets if isinstance(node, (ast.Assign, ast.Delete)) else
                   [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        if any(_through_manifest(t) for t in targets):
            found.setdefault(node.lineno, "changes the manifest")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _MUTATORS
              and _through_manifest(node.func.value)):
            found.setdefault(node.lineno, f"changes the manifest (.{node.func.attr})")
        elif (isinstance(node, ast.Name) and node.id == "MANIFEST") or (
                isinstance(node, ast.Attribute) and node.attr == "MANIFEST") or (
                isinstance(node, ast.Constant) and node.value == "manifest.json"):
            found.setdefault(node.lineno, "names manifest.json")
    return [f"{line}: {what}" for line, what in sorted(found.items())]


def test_the_manifest_writers_are_read_from_bundle_py():
    assert {"save", "commit", "begin_build", "skip_stage", "end_build", "create_or_resume"} <= manifest_writers()


def test_the_manifest_checks_catch_a_stage_that_records_into_the_manifest():
    stage = ("def claim(bundle, plan):\n"
             "    bundle.manifest.setdefault('plan', {})['embeddings'] = plan\n"
             "    bundle.manifest['counts'] = {}\n"
             "    bundle.manifest['stages'].update(x=1)\n"
             "    bundle.save()\n"
             "    bundle.commit('embeddings', [])\n"
             "    atomic_write_json(bundle.root / MANIFEST, {})\n")
    assert manifest_commits(stage, manifest_writers()) == ["5: claim() calls .save()", "6: claim() calls .commit()"]
    assert manifest_touches(stage) == ["2: changes the manifest", "3: changes the manifest",
                                               "4: changes the manifest (.update)", "7: names manifest.json"]
    reader = ("def fit(bundle, artifact):\n"
              "    n = bundle.manifest['counts'].get('ok', 0)\n"
              "    files, info = artifact.save(bundle)\n"
              "    raise ValueError(f'{bundle.root}/manifest.json: no cells')\n")
    assert manifest_commits(reader, manifest_writers()) == [] and manifest_touches(reader) == []


def test_only_the_pipeline_commits_and_no_stage_touches_the_manifest():
    """A stage returns (files, info) and the pipeline commits them, so a parallel worker can write its own files
    and leave the one manifest to one driver (docs/ARCHITECTURE.md, "Stages and their artifacts")."""
    writers = manifest_writers()
    offenders = [f"{m}:{hit}" for m, src in _modules() if m not in MANIFEST_OWNERS
                 for hit in manifest_commits(src, writers)]
    offenders += [f"{m}:{hit}" for m, src in _modules("geo/stages") for hit in manifest_touches(src)]
    assert not offenders, "manifest.json written outside geo.pipeline:\n" + "\n".join(offenders)


# ---------------------------------------------------------------- every write through geo.store.atomic
ATOMIC = "geo.store.atomic"
# Direct writes that are right as they are, each with its reason; (module, function, writer).
WRITE_EXCEPTIONS = {
    # The write lock is created with O_CREAT | O_EXCL, which is what lets exactly one writer win: a temp file
    # renamed into place would silently replace a competitor's lock.
    ("geo.store.lock", "_try_take", "os.open"),
    ("geo.store.lock", "_try_take", "os.fdopen"),
    ("geo.store.lock", "_try_take", "json.dump"),
}
# Methods that write a file whatever they are called on, and module functions that do.
_WRITER_METHODS = {"write_text", "write_bytes", "to_parquet", "to_feather", "to_pickle", "to_hdf", "savefig",
                   "write_table", "write_index", "save_file", "ParquetWriter", "imwrite"}
_WRITER_FUNCTIONS = {("json", "dump"), ("pickle", "dump"), ("torch", "save"), ("np", "save"), ("np", "savez"),
                     ("np", "savez_compressed"), ("numpy", "save"), ("shutil", "copy"), ("shutil", "copy2"),
                     ("shutil", "copyfile"), ("shutil", "copytree"), ("shutil", "move"), ("os", "replace"),
                     ("os", "rename")}
_WRITE_FLAGS = {"O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND", "O_TRUNC"}


def _opens_for_writing(call: ast.Call) -> bool:
    """open()/Path.open()/os.fdopen() with a mode that writes (or one that cannot be read off the source), and
    os.open() with a writing flag. PIL's ``Image.open`` only reads."""
    if _receiver(call) == "os" and _called(call) == "open":
        return any(isinstance(n, ast.Attribute) and n.attr in _WRITE_FLAGS for a in call.args[1:2] for n in ast.walk(a))
    if _called(call) not in ("open", "fdopen") or _receiver(call) == "Image":
        return False
    mode = next((k.value for k in call.keywords if k.arg == "mode"), None)
    if mode is None:  # builtin open(file, mode) and os.fdopen(fd, mode); Path.open(mode)
        at = 0 if isinstance(call.func, ast.Attribute) and _receiver(call) != "os" else 1
        mode = call.args[at] if len(call.args) > at else ast.Constant("r")
    return not (isinstance(mode, ast.Constant) and isinstance(mode.value, str) and not set(mode.value) & set("wax+"))


def _writes_a_file(call: ast.Call) -> bool:
    name, on = _called(call), _receiver(call)
    if _opens_for_writing(call) or (on, name) in _WRITER_FUNCTIONS or name in _WRITER_METHODS:
        return True
    if name in ("to_csv", "to_json"):  # with a target; no target returns text, sys.stdout prints
        target = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "path_or_buf"), None)
        return target is not None and not (isinstance(target, ast.Attribute) and target.attr in ("stdout", "stderr"))
    return False


def direct_writes(module: str, source: str) -> list[str]:
    """The file writes in ``source`` that bypass geo.store.atomic (the listed exceptions aside)."""
    out = []
    for call, where in _calls(source):
        if not _writes_a_file(call):
            continue
        writer = _writer_name(call)
        if (module, where, writer) not in WRITE_EXCEPTIONS:
            out.append(f"{module}:{call.lineno} {where}() calls {writer}()")
    return out


def test_the_write_check_catches_direct_writes():
    source = ("def report(path, df, fig, tables):\n"
              "    path.write_text('x')\n"
              "    fig.savefig(path)\n"
              "    df.to_parquet(path)\n"
              "    with open(path, 'w') as f:\n"
              "        json.dump({}, f)\n"
              "    pq.write_table(tables, path)\n"
              "    torch.save({}, path)\n"
              "    df.to_csv(path, index=False)\n"
              "    with path.open(mode='ab') as f: pass\n"
              "    fd = os.open(path, os.O_CREAT | os.O_WRONLY)\n")
    assert [w.split(" calls ")[1] for w in direct_writes("geo.eval.x", source)] == [
        "write_text()", "savefig()", "to_parquet()", "open()", "json.dump()", "pq.write_table()", "torch.save()",
        "to_csv()", "open()", "os.open()"]
    reads = ("def read(path, df, data):\n"
             "    with open(path) as f: pass\n"
             "    with open(path, 'rb') as f: pass\n"
             "    with path.open() as f: pass\n"
             "    Image.open(io.BytesIO(data))\n"
             "    fd = os.open(path, os.O_RDONLY)\n"
             "    text = df.to_json(orient='records')\n"
             "    df.to_csv(sys.stdout, index=False)\n"
             "    atomic_write_bytes(path, json.dumps({}).encode())\n")
    assert direct_writes("geo.eval.x", reads) == []


def test_every_write_goes_through_geo_store_atomic():
    offenders = [w for m, src in _modules() if m != ATOMIC for w in direct_writes(m, src)]
    assert not offenders, "files written without geo.store.atomic:\n" + "\n".join(offenders)


def test_every_listed_write_exception_still_exists():
    """An exception whose write is gone must leave the list, so the list never permits more than it says."""
    present = {(m, where, _writer_name(c))
               for m, src in _modules() for c, where in _calls(src) if _writes_a_file(c)}
    assert WRITE_EXCEPTIONS <= present, WRITE_EXCEPTIONS - present
