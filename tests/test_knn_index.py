"""FAISS stage: index choice under a RAM budget, recall against exact search, fail-fast planning."""
import faiss
import numpy as np
import pandas as pd
import pytest

from geo.stages.knn import (
    INFOS_FILE,
    STAGE,
    KnnConfig,
    KnnIndex,
    fit_knn,
    parse_bytes,
    plan_index,
)
from geo.store.bundle import Bundle, BundleError, read_json
from geo.store.embeddings import (
    EmbeddingReader,
    finished_shards,
    marker_path,
    write_shard,
)


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Vectors around 50 centres, like embeddings of photos of a few kinds of places."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, dim))
    x = centres[rng.integers(0, 50, n)] + 0.6 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def bundle_with(tmp_path, emb: np.ndarray, shard_rows: int = 1000) -> Bundle:
    b = Bundle.create_or_resume(tmp_path / "b", {"name": "test"}, emb.shape[1])
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"id": [f"p{i}" for i in range(len(emb))], "path": [f"/x/p{i}.jpg" for i in range(len(emb))],
                       "lat": rng.uniform(-60, 60, len(emb)), "lon": rng.uniform(-180, 180, len(emb))})
    for i, s in enumerate(range(0, len(emb), shard_rows)):
        write_shard(b, i, df.iloc[s:s + shard_rows], emb[s:s + shard_rows], {"failed": 0, "seconds": 0.0, "errors": []})
    b.commit("embeddings", [p for s in finished_shards(b) for p in (s, marker_path(s))],
             {"ok": len(emb), "failed": 0}, replace=("embeddings/",))
    return b


def build_knn(b: Bundle, config: KnnConfig | None = None) -> dict:
    """Fit the index from the committed shards, save it and commit the stage, as the pipeline does."""
    files, infos = fit_knn(EmbeddingReader(b), config or KnnConfig(), log=lambda m: None).save(b)
    b.commit(STAGE, files, infos, replace=("index/",))
    return infos


def test_small_gallery_gets_exact_index_that_finds_itself(tmp_path):
    emb = clustered(500, 32)
    b = bundle_with(tmp_path, emb, shard_rows=128)
    infos = build_knn(b)
    assert infos["kind"] == "flat" and infos["ntotal"] == 500 and infos["recall@10"] == 1.0
    index = KnnIndex.load(b)
    assert index.ntotal == 500 and index.infos["kind"] == "flat"
    _, rows = index.search(emb[[3, 333]], 1)
    assert rows[:, 0].tolist() == [3, 333]


def test_ivf_index_reaches_recall_target_on_thousands_of_vectors(tmp_path):
    emb = clustered(4000, 64)
    b = bundle_with(tmp_path, emb)
    infos = build_knn(b, KnnConfig(exact_max=1000))
    assert infos["kind"] == "ivf_flat"
    assert infos["nprobe"] >= 1
    # recall measured independently of the stage's own report
    index = KnnIndex.load(b)
    assert index.ntotal == 4000 and index.infos["nprobe"] == infos["nprobe"]
    q = emb[np.random.default_rng(5).choice(len(emb), 300, replace=False)] + 0.01
    exact = np.argsort(-(q @ emb.T), axis=1)[:, :10]
    _, got = index.search(q.astype(np.float32), 10)
    recall = np.mean([len(set(a) & set(g)) / 10 for a, g in zip(exact, got)])
    assert recall >= 0.95
    on_disk = read_json(b.path(INFOS_FILE))
    assert on_disk["recall@10"] >= 0.95 and on_disk["bytes"] > 0 and on_disk["median_query_ms"] > 0
    mapped = KnnIndex.load(b, mmap=True)  # an index bigger than memory is opened memory-mapped, read-only
    _, via_mmap = mapped.search(q.astype(np.float32), 10)
    np.testing.assert_array_equal(via_mmap, got)


def test_plan_moves_to_pq_then_fails_fast_when_budget_shrinks():
    n, dim = 2_000_000, 512
    assert plan_index(n, dim, parse_bytes("16GB")).kind == "ivf_flat"
    pq = plan_index(n, dim, parse_bytes("1GB"))
    assert pq.kind == "ivf_pq" and pq.est_bytes <= parse_bytes("1GB")
    with pytest.raises(BundleError, match="raise --memory"):
        plan_index(n, dim, parse_bytes("10MB"))


def test_parse_bytes_units():
    assert parse_bytes("4GB") == 4 << 30
    assert parse_bytes("512MiB") == 512 << 20
    assert parse_bytes("1e6") == 1_000_000


def test_plan_takes_an_hnsw_quantizer_when_lists_are_many():
    small, huge = plan_index(1_000_000, 512, parse_bytes("64GB")), plan_index(50_000_000, 64, parse_bytes("64GB"))
    assert small.factory == "IVF1024,Flat"  # nlist ~ sqrt(n): k-means cost grows linearly with n
    assert huge.nlist >= 4096 and huge.factory.startswith(f"IVF{huge.nlist}_HNSW32,")
    index = faiss.index_factory(64, huge.factory.replace(str(huge.nlist), "64"), faiss.METRIC_INNER_PRODUCT)
    assert faiss.extract_index_ivf(index).nlist == 64  # the factory string is one FAISS builds


@pytest.mark.parametrize("exact_max", [100_000, 1000])
def test_excluding_rows_searches_as_if_they_were_not_indexed(tmp_path, exact_max):
    emb = clustered(4000, 64)
    b = bundle_with(tmp_path, emb)
    build_knn(b, KnnConfig(exact_max=exact_max, recall_target=1.0))
    index = KnnIndex.load(b)
    gone = np.arange(0, 4000, 3)
    q = emb[gone[:50]]
    sims, rows = index.excluding(gone).search(q, 10)
    assert not np.isin(rows, gone).any()
    kept = np.setdiff1d(np.arange(4000), gone)
    exact = kept[np.argsort(-(q @ emb[kept].T), axis=1)[:, :10]]
    assert np.mean([len(set(a) & set(g)) / 10 for a, g in zip(exact, rows)]) >= 0.95
    _, plain = index.search(q, 1)
    np.testing.assert_array_equal(plain[:, 0], gone[:50])  # the index itself is unchanged


def test_index_candidates_price_every_kind_the_plan_chooses_among():
    from geo.stages.knn import index_candidates

    for n, budget in ((50_000, "8GB"), (2_000_000, "16GB"), (2_000_000, "1GB")):
        plan = plan_index(n, 512, parse_bytes(budget))
        cands = {c.factory: c for c in index_candidates(n, 512, parse_bytes(budget), flops=1e10)}
        assert plan.factory in cands and cands[plan.factory].fits  # the chosen one is priced and fits
        assert cands["Flat"].est_bytes == n * 512 * 4
    small, big = (index_candidates(n, 512, parse_bytes("64GB"), 1e10)[1] for n in (1_000_000, 4_000_000))
    assert 4 < big.build_s / small.build_s < 8  # nlist ~ sqrt(n): 4x the photos, ~6x the time (n^1.25, not n^2)
    assert big.query_ms < index_candidates(4_000_000, 512, parse_bytes("64GB"), 1e10)[0].query_ms / 10
