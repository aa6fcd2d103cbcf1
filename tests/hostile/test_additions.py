"""`geo add` never leaves a bundle worse than it found it (issue 27): whatever the input's form, the new
shards join the old ones; an addition that fails is rolled back, so the bundle answers exactly as before."""
from __future__ import annotations

import json

import pytest
from conftest import cli, manifest_of, one_line_error, photo

import geo.pipeline


def _answer(bundle) -> dict:
    r = cli("query", photo(3), "--index", bundle, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.splitlines()[0])


def _exif_folder(tmp_path, textured, n: int = 3):
    from test_manifest import _gps_photo

    folder = tmp_path / "trip"
    for i in range(n):
        _gps_photo(lambda w, h: textured(w, h, seed=i), folder / f"new{i}.jpg", 40.0 + i, 3.0 + i)
    return folder


def test_an_exif_folder_joins_a_bundle_built_from_a_csv(bundle, tmp_path, textured):
    """Finding 1: the CSV's ids were `string`, the folder's `large_string`; the addition failed after writing
    its shard and every later command refused the bundle."""
    r = cli("add", bundle, _exif_folder(tmp_path, textured), "-q")
    assert r.exit_code == 0, r.output
    assert "69 photos indexed" in r.output
    info = cli("info", bundle, "--verify")
    assert info.exit_code == 0, info.output
    ids = geo.open_index(bundle).knn.ids
    assert len(ids) == 69 and "trip/new0.jpg" not in ids and "new0.jpg" in list(ids)


def _as_table(folder, tmp_path, suffix):
    from geo.data.manifest import read_manifest

    df = read_manifest(folder).df.assign(owner=lambda d: d["id"].str.len())  # an int where the bundle has text
    path = tmp_path / f"more{suffix}"
    df.to_csv(path, index=False) if suffix == ".csv" else df.to_parquet(path)
    return [path]


def _as_embeddings(folder, tmp_path, _):
    import numpy as np

    from geo.data.manifest import read_manifest

    df = read_manifest(folder).df
    emb = np.random.default_rng(0).normal(size=(len(df), 1280)).astype("float32")
    df.assign(embedding=list(emb)).to_parquet(tmp_path / "emb.parquet")
    return ["--embeddings", tmp_path / "emb.parquet"]


@pytest.mark.parametrize("form,suffix", [(_as_table, ".csv"), (_as_table, ".parquet"), (_as_embeddings, "")])
def test_every_input_form_adds_shards_of_the_bundle_s_schema(bundle, tmp_path, textured, form, suffix):
    import pyarrow.parquet as pq

    args = form(_exif_folder(tmp_path, textured), tmp_path, suffix)
    r = cli("add", bundle, *args, "-q")
    assert r.exit_code == 0, r.output
    shards = sorted((bundle / "embeddings").glob("part-*.parquet"))
    first, last = (pq.read_schema(s).remove_metadata() for s in (shards[0], shards[-1]))
    assert last == first
    meta = geo.open_index(bundle).bundle and pq.read_table(shards[-1]).to_pandas()
    assert meta["owner"].tolist() == [str(len(i)) for i in meta["id"]] if form is _as_table else meta["owner"].isna().all()


def _fail_the_commit(monkeypatch):
    """The manifest write that would finish the addition raises ENOSPC."""
    import errno

    import geo.store.bundle as store
    real = store.atomic_write_json

    def write(path, obj):
        if any(a.get("done") for a in obj.get("additions", [])) and obj.get("counts", {}).get("ok", 0) > 66:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, obj)

    monkeypatch.setattr(store, "atomic_write_json", write)


def _fail_after_the_index(monkeypatch):
    """The addition dies after the kNN index (and errors.parquet) were rewritten in place."""
    def boom(*_a, **_k):
        raise RuntimeError("killed while refreshing the cells")

    monkeypatch.setattr(geo.pipeline, "_refresh_with_photos", boom)


@pytest.mark.parametrize("fail", [_fail_the_commit, _fail_after_the_index])
def test_a_failed_addition_leaves_the_bundle_answering_as_before(bundle, tmp_path, textured, monkeypatch, fail):
    """Finding 1: the failed addition's shard was committed and the bundle refused forever after."""
    before, files_before = _answer(bundle), manifest_of(bundle)["files"]
    folder = _exif_folder(tmp_path, textured)
    with monkeypatch.context() as m:
        fail(m)
        r = cli("add", bundle, folder, "-q")
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert _answer(bundle) == before
    assert manifest_of(bundle)["files"] == files_before
    assert cli("info", bundle, "--verify").exit_code == 0
    assert not (bundle / ".geo-rollback").exists()
    r = cli("add", bundle, folder, "-q")  # the same addition again resumes and completes
    assert r.exit_code == 0 and "69 photos indexed" in r.output, r.output
    assert len(geo.open_index(bundle).knn.ids) == 69


def test_an_abandoned_addition_s_shards_are_not_taken_by_the_next(bundle, tmp_path, textured, monkeypatch):
    """A failed addition keeps its finished shards for a re-run; another input must not adopt them."""
    with monkeypatch.context() as m:
        _fail_after_the_index(m)
        assert cli("add", bundle, _exif_folder(tmp_path, textured), "-q").exit_code != 0
    other = tmp_path / "other"
    from test_manifest import _gps_photo
    _gps_photo(lambda w, h: textured(w, h, seed=9), other / "solo.jpg", -33.5, 18.25)
    r = cli("add", bundle, other, "-q")
    assert r.exit_code == 0, r.output
    ids = list(geo.open_index(bundle).knn.ids)
    assert len(ids) == 67 and "solo.jpg" in ids and "new0.jpg" not in ids


def test_a_photo_already_indexed_under_another_id_is_refused_naming_both(bundle, tmp_path):
    """Finding 10: the same files under new ids were indexed twice (caught within one manifest only)."""
    import shutil

    import pandas as pd

    gallery = pd.read_csv(photo(0).parents[1] / "gallery.csv", dtype={"id": str})
    old_id = gallery.loc[gallery["path"] == f"gallery/{photo(0).name}", "id"].item()
    shutil.copy(photo(0), tmp_path / "renamed.jpg")
    shutil.copy(photo(1), tmp_path / "other.jpg")
    (tmp_path / "other.jpg").write_bytes((tmp_path / "other.jpg").read_bytes() + b"\0")  # same size class, new bytes
    m = tmp_path / "more.csv"
    m.write_text(f"id,path,lat,lon\nfresh-1,{tmp_path / 'renamed.jpg'},1,2\nfresh-2,{tmp_path / 'other.jpg'},3,4\n")
    before = manifest_of(bundle)
    r = cli("add", bundle, m, "-q")
    one_line_error(r, "1 photos are already in the bundle under another id",
                   f"'fresh-1' is the photo indexed as '{old_id}'")
    assert "fresh-2" not in r.output
    assert manifest_of(bundle) == before


def test_an_addition_killed_mid_way_is_named_and_put_back_by_its_re_run(bundle, tmp_path, textured, monkeypatch):
    """kill -9 after the kNN index was rewritten: no handler runs, so the files kept aside stay there; readers
    say what happened, and the re-run puts the files back, then completes."""
    import geo.store.atomic as atomic

    folder = _exif_folder(tmp_path, textured)
    with monkeypatch.context() as m:
        _fail_after_the_index(m)
        m.setattr(atomic, "_restore", lambda root, keep: None)  # as if killed: nothing is put back
        assert cli("add", bundle, folder, "-q").exit_code != 0
    assert (bundle / ".geo-rollback" / "index" / "knn.faiss").exists()
    one_line_error(cli("query", photo(3), "--index", bundle), "knn.faiss", "re-run that `geo add`")
    r = cli("add", bundle, folder, "-q")
    assert r.exit_code == 0 and "69 photos indexed" in r.output, r.output
    assert cli("info", bundle, "--verify").exit_code == 0 and not (bundle / ".geo-rollback").exists()
