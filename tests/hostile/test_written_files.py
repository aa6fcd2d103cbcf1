"""Files geo writes: the user's umask decides who can read them; report.html escapes every value it shows."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from geo.store.predictions import answers_to_frame, write_predictions


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    # a fresh interpreter: the mode is read from the umask once per process
    code = ("import os, sys; os.umask(int(sys.argv[2])); from geo.store.atomic import atomic_write_bytes; "
            "atomic_write_bytes(sys.argv[1], b'x')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "f.bin"), str(umask)], check=True)
    assert os.stat(tmp_path / "f.bin").st_mode & 0o777 == mode
    assert not list(tmp_path.glob(".*.tmp"))


def test_report_html_escapes_every_value(tmp_path):
    from geo.eval.report import build_report

    evil = '<script>alert(1)</script>'
    img = '<img src=x onerror=alert(2)>'
    answers = [{"image": img, "lat": 48.0 + i, "lon": 2.0, "mode": evil, "error": None} for i in range(3)]
    answers.append({"image": "b.jpg", "lat": None, "lon": None, "error": img + evil})
    df = answers_to_frame(answers, [evil, img, "ok", "bad"], [(48.0, 2.0)] * 4, suite=evil,
                          extra={"scene": [evil] * 4, "country": [img] * 4})
    write_predictions(tmp_path / "p.parquet", df)
    build_report(tmp_path / "p.parquet", tmp_path / "rep", ci=False)
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "<script>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x onerror=alert(2)&gt;" in page
