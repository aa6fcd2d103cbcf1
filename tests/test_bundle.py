"""Bundle format: atomic writes, hashes, refusal of tampered, truncated or newer bundles."""
import json

import pytest

from geo.bundle import FORMAT_VERSION, MANIFEST, Bundle, BundleError, atomic_write_bytes, open_bundle


def make(tmp_path) -> Bundle:
    b = Bundle.create_or_resume(tmp_path / "b", {"name": "efficientnet_lite0"}, 8)
    atomic_write_bytes(b.path("index/data.bin"), b"0123456789")
    b.register("demo", ["index/data.bin"], {"ok": 1})
    return b


def test_roundtrip_and_verify(tmp_path):
    b = make(tmp_path)
    again = open_bundle(b.root)
    assert again.stage("demo") == {"ok": 1}
    assert again.manifest["files"]["index/data.bin"]["bytes"] == 10


def test_tampered_file_is_refused_with_its_name(tmp_path):
    b = make(tmp_path)
    b.path("index/data.bin").write_bytes(b"0123456780")
    with pytest.raises(BundleError, match=r"data\.bin.*sha256"):
        open_bundle(b.root)


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
    from geo.bundle import atomic_write

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
    b.register("demo", [b.path("index/a.bin")])
    assert list(open_bundle("rel").manifest["files"]) == ["index/a.bin"]
