"""Bundle format: atomic writes, sizes and hashes, refusal of tampered, truncated or newer bundles."""
import json

import pytest

from geo.store.atomic import atomic_write_bytes
from geo.store.bundle import FORMAT_VERSION, MANIFEST, Bundle, BundleError, open_bundle


def make(tmp_path) -> Bundle:
    b = Bundle.create_or_resume(tmp_path / "b", {"name": "efficientnet_lite0"}, 8)
    atomic_write_bytes(b.path("index/data.bin"), b"0123456789")
    b.commit("demo", ["index/data.bin"], {"ok": 1})
    return b


def test_roundtrip_and_verify(tmp_path):
    b = make(tmp_path)
    again = open_bundle(b.root)
    assert again.stage("demo") == {"ok": 1}
    assert again.manifest["files"]["index/data.bin"]["bytes"] == 10


def test_tampered_file_is_refused_with_its_name_when_hashes_are_checked(tmp_path):
    b = make(tmp_path)
    b.path("index/data.bin").write_bytes(b"0123456780")  # same size, other bytes
    open_bundle(b.root)  # opening checks sizes only: fast on a bundle of gigabytes
    with pytest.raises(BundleError, match=r"data\.bin.*sha256"):
        open_bundle(b.root, hashes=True)
    assert open_bundle(b.root, verify=False).verify(hashes=False) == 1


def test_commit_replaces_a_rerun_stage_files(tmp_path):
    b = make(tmp_path)
    atomic_write_bytes(b.path("index/other.bin"), b"xyz")
    b.commit("demo", ["index/other.bin"], {"ok": 2}, replace=("index/",))
    m = open_bundle(b.root, hashes=True).manifest
    assert set(m["files"]) == {"index/other.bin"} and m["stages"]["demo"] == {"ok": 2}


def test_truncated_and_missing_files_are_refused(tmp_path):
    b = make(tmp_path)
    b.path("index/data.bin").write_bytes(b"01234")
    with pytest.raises(BundleError, match="truncated"):
        open_bundle(b.root)
    b.path("index/data.bin").unlink()
    with pytest.raises(BundleError, match="missing"):
        open_bundle(b.root)


def test_newer_format_and_garbage_manifest_are_refused(tmp_path):
    b = make(tmp_path)
    m = json.loads(b.path(MANIFEST).read_text())
    m["format_version"] = FORMAT_VERSION + 1
    b.path(MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="newer"):
        open_bundle(b.root)
    b.path(MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        open_bundle(b.root)


def test_resume_with_other_backbone_is_refused(tmp_path):
    make(tmp_path)
    with pytest.raises(BundleError, match="backbone"):
        Bundle.create_or_resume(tmp_path / "b", {"name": "timm:resnet18"}, 8)


def test_failed_atomic_write_leaves_previous_file(tmp_path):
    b = make(tmp_path)
    from geo.store.atomic import atomic_write

    def boom(tmp):
        open(tmp, "wb").write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(b.path("index/data.bin"), boom)
    assert b.path("index/data.bin").read_bytes() == b"0123456789"
    assert not [p for p in b.path("index").iterdir() if p.name.endswith(".tmp")]


def test_relative_bundle_paths_register_inside_the_bundle(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    b = Bundle.create_or_resume("rel", {"name": "x"}, 4)
    atomic_write_bytes(b.path("index/a.bin"), b"abc")
    b.commit("demo", [b.path("index/a.bin")])
    assert list(open_bundle("rel").manifest["files"]) == ["index/a.bin"]
