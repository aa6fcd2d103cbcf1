"""scripts/setup.sh (issue 27, finding 18): the demo installs what geo needs and nothing else; the tests' extra
(Ray, selenium) only with `setup.sh test`; torch from PyTorch's CPU index only when GEO_TORCH_INDEX names it.
Run against a fake python that records each pip call, so nothing is installed or downloaded."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKE = f"""#!/bin/sh
if [ "$1 $2" = "-m venv" ]; then
    mkdir -p "$3/bin"
    printf 'PATH="%s:$PATH"\\n' "$(cd "$3/bin" && pwd)" > "$3/bin/activate"
    cp "$0" "$3/bin/python"
    exit 0
fi
if [ "$1" = "-" ]; then exec {sys.executable} "$@"; fi
echo "$*" >> "$PIP_LOG"
"""


def _setup(tmp_path: Path, *args: str, gpu: bool = False, env: dict | None = None) -> list[str]:
    (tmp_path / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    bin_ = tmp_path / "fakebin"
    bin_.mkdir()
    (bin_ / "python3").write_text(FAKE)
    (bin_ / "python3").chmod(0o755)
    if gpu:
        (bin_ / "nvidia-smi").write_text("#!/bin/sh\n")
        (bin_ / "nvidia-smi").chmod(0o755)
    log = tmp_path / "pip.log"
    path = f"{bin_}:/usr/bin:/bin"
    subprocess.run(["bash", str(tmp_path / "scripts" / "setup.sh"), *args], check=True, timeout=60,
                   env={"PATH": path, "PIP_LOG": str(log), "HOME": str(tmp_path), **(env or {})})
    return log.read_text().splitlines()


@pytest.mark.skipif(os.name != "posix", reason="a POSIX shell script")
def test_the_demo_installs_geo_alone_and_the_tests_add_their_extra(tmp_path):
    demo = _setup(tmp_path / "a")
    assert demo[-1] == "-m pip install -q -e ." and not any("[test]" in x for x in demo)
    assert "scripts/setup.sh        #" in (ROOT / "scripts" / "demo.sh").read_text()  # the demo calls it bare
    assert _setup(tmp_path / "b", "test")[-1] == "-m pip install -q -e .[test]"
    assert "scripts/setup.sh test" in (ROOT / "scripts" / "test.sh").read_text()


@pytest.mark.skipif(os.name != "posix", reason="a POSIX shell script")
def test_torch_comes_from_another_index_only_when_the_user_names_it(tmp_path):
    """No host the user did not name is contacted (an offline CI reaches only its package index); named, the
    pinned versions come from it."""
    assert not any("extra-index-url" in x for x in _setup(tmp_path / "a"))
    assert not any("extra-index-url" in x for x in _setup(tmp_path / "b", gpu=True))
    assert not any("extra-index-url" in x for x in _setup(tmp_path / "c", env={"GEO_TORCH_INDEX": "none"}))
    cpu = _setup(tmp_path / "d", env={"GEO_TORCH_INDEX": "https://download.pytorch.org/whl/cpu"})
    assert ("-m pip install -q torch==2.14.1 torchvision==0.29.1 --extra-index-url "
            "https://download.pytorch.org/whl/cpu") in cpu
