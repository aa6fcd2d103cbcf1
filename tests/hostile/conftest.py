"""The hostile corpus (issue 16): each case builds its bad input on the fly (no large or odd file is
committed) and checks that geo refuses it with one line naming the file and the reason, keeps going with the
rest, and loses nothing already written. benchmarks/RESULTS.md lists the classes and their counts."""
from __future__ import annotations

import json
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from geo.cli import app
from geo.store.atomic import sha256_file

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "osv5m"


@dataclass
class Run:
    exit_code: int
    output: str  # stdout and stderr together
    stdout: str
    exception: BaseException | None = None  # what escaped the command group (with --debug)


def cli(*args: object, timeout: float = 120.0) -> Run:
    """`geo ARGS` in this process through the real command group (its exception boundary included), failing
    the test instead of hanging it when the command blocks (a FIFO read, a lock wait)."""
    box: dict = {}

    def go() -> None:
        r = CliRunner().invoke(app, [str(a) for a in args])
        escaped = r.exception if not isinstance(r.exception, SystemExit) else None
        box["r"] = Run(r.exit_code, r.output, r.stdout, escaped)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"geo {' '.join(map(str, args))} did not finish in {timeout} s")
    return box["r"]


def one_line_error(r: Run, *words: str, code: int = 2) -> None:
    """The failure contract: the exit code, an `error:` line with the words, and no traceback."""
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output, r.output
    line = next((x for x in r.output.splitlines() if x.startswith("error:")), "")
    for w in words:
        assert w in line, r.output


@pytest.fixture
def bundle(cli_bundle, tmp_path) -> Path:
    """A private copy of the session's 66-photo bundle (every stage), free to damage."""
    return Path(shutil.copytree(cli_bundle[1], tmp_path / "bundle"))


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def write_manifest(bundle: Path, m: dict) -> None:
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2))


def rehash(bundle: Path, rel: str) -> None:
    """Record a file's current size and sha256 in the manifest: damage that the checksums cannot see."""
    m = manifest_of(bundle)
    m["files"][rel] = {"sha256": sha256_file(bundle / rel), "bytes": (bundle / rel).stat().st_size}
    write_manifest(bundle, m)


def photo(i: int = 0) -> Path:
    return sorted((EXAMPLES / "gallery").glob("*.jpg"))[i]
