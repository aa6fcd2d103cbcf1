"""geo export refuses what it cannot do safely, in one line naming the file (issue 27, finding 17)."""
from __future__ import annotations

from conftest import cli, manifest_of, one_line_error


def test_an_export_into_a_folder_holding_files_is_refused_and_leaves_them(bundle, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-00000.parquet").write_text("someone else's")
    one_line_error(cli("export", bundle, out), str(out), "not an empty folder")
    assert [p.name for p in out.iterdir()] == ["part-00000.parquet"]
    one_line_error(cli("export", bundle, tmp_path / "x", "--format", "csv"), "--format", "clip-retrieval")
    (tmp_path / "file").write_text("")
    one_line_error(cli("export", bundle, tmp_path / "file"), "not an empty folder")
    one_line_error(cli("export", bundle, bundle / "vectors"), "inside the bundle")  # it would litter the bundle
    assert not (bundle / "vectors").exists()


def test_a_shard_altered_since_the_build_is_refused_not_exported(bundle, tmp_path):
    shard = sorted(r for r in manifest_of(bundle)["files"] if r.startswith("embeddings/part-"))[1]
    data = bytearray((bundle / shard).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 can tell
    (bundle / shard).write_bytes(bytes(data))
    one_line_error(cli("export", bundle, tmp_path / "out"), shard.split("/")[-1], "sha256")
