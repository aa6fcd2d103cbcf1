"""kNN stage: choose a FAISS index from the gallery size and a RAM budget, build it from the shards, measure it.

Autofaiss-style: the plan (index type and its memory) is computed and printed
before any work, and a plan that cannot fit the budget fails at once with the
numbers and the option to change. The index is trained on a sample and then
filled shard by shard, so the whole gallery is never held in memory twice.
``index/index_infos.json`` records what was built and how well it retrieves
(recall@k against exact search on held-in queries, median latency).

Artifact: :class:`KnnIndex`, the FAISS index plus each row's id, path and
coordinates in FAISS id order. Files: ``index/knn.faiss``, ``index/index_infos.json``.
"""
from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import faiss
import numpy as np

from geo.core.memory import release_unused
from geo.core.sizes import default_memory, human_bytes, index_budget, parse_bytes
from geo.core.tables import text_objects
from geo.store.atomic import atomic_write_faiss, atomic_write_json
from geo.store.bundle import Bundle, BundleError
from geo.store.embeddings import EmbeddingReader, shard_pieces

if TYPE_CHECKING:
    import pandas as pd

STAGE = "knn_index"
INDEX_FILE = "index/knn.faiss"
INFOS_FILE = "index/index_infos.json"
META_COLUMNS = ["id", "path", "lat", "lon"]
HNSW_NLIST = 4096  # from this many inverted lists the coarse quantizer is an HNSW graph
TRAIN_PER_LIST = 64  # k-means sample per inverted list (FAISS warns below 39)
PQ_BYTES = (128, 96, 64, 48, 32, 16, 8)  # IVF-PQ code sizes, most accurate first


@dataclass(frozen=True)
class KnnConfig:
    # Memory the index may use (picks Flat / IVF-Flat / IVF-PQ); None: geo.core.sizes.index_budget, a share of
    # the build's --memory.
    ram_budget: str | int | None = None
    exact_max: int = 100_000     # largest gallery indexed exactly
    recall_k: int = 10
    recall_target: float = 0.95  # nprobe is the smallest power of two reaching it


@dataclass(frozen=True)
class IndexPlan:
    kind: str               # "flat" | "ivf_flat" | "ivf_pq"
    factory: str            # faiss.index_factory string
    n: int
    dim: int
    nlist: int
    pq_m: int
    est_bytes: int

    def describe(self) -> str:
        return f"{self.factory} for {self.n:,} x {self.dim} vectors, about {human_bytes(self.est_bytes)} in memory"


def plan_index(n: int, dim: int, ram_budget: int, exact_max: int = 100_000) -> IndexPlan:
    """Pick the most accurate index that fits ``ram_budget``.

    Exact inner product up to ``exact_max`` vectors (it is fast enough there and
    has perfect recall); above it IVF-Flat while the raw vectors fit, else IVF-PQ
    with the largest code size that fits.

    nlist ~ sqrt(n) (a power of two): k-means costs nlist x its training sample
    (64 per list), so the build grows linearly with n, where FAISS's 4-16 sqrt(n)
    buys query speed with a quadratic training cost that a CPU build cannot pay at
    a million photos. From ``HNSW_NLIST`` lists the coarse quantizer is an HNSW
    graph (IVF-HNSW), so assigning a vector no longer scans every centroid.
    """
    if n <= exact_max:
        return IndexPlan("flat", "Flat", n, dim, 0, 0, n * dim * 4)
    nlist, quantizer, centroids = ivf_layout(n, dim)
    ivf_flat = _ivf_flat_bytes(n, dim, centroids)
    if ivf_flat <= ram_budget:
        return IndexPlan("ivf_flat", f"{quantizer},Flat", n, dim, nlist, 0, ivf_flat)
    for m in _pq_sizes(dim):
        est = _ivf_pq_bytes(n, dim, m, centroids)
        if est <= ram_budget:
            return IndexPlan("ivf_pq", f"{quantizer},PQ{m}", n, dim, nlist, m, est)
    smallest = n * (8 + 8) + centroids
    raise BundleError(
        f"no FAISS index for {n:,} x {dim} vectors fits the index budget of {human_bytes(ram_budget)} "
        f"(the smallest, {quantizer},PQ8, needs about {human_bytes(smallest)}); raise --memory"
    )


def ivf_layout(n: int, dim: int) -> tuple[int, str, int]:
    """(nlist ~ sqrt(n) as a power of two, the factory's quantizer part, the quantizer's bytes)."""
    nlist = int(2 ** round(math.log2(math.sqrt(max(n, 1)))))
    hnsw = nlist >= HNSW_NLIST
    return nlist, f"IVF{nlist}_HNSW32" if hnsw else f"IVF{nlist}", nlist * dim * 4 + (nlist * 32 * 2 * 4 if hnsw else 0)


def _ivf_flat_bytes(n: int, dim: int, centroids: int) -> int:
    return n * dim * 4 + n * 8 + centroids


def _ivf_pq_bytes(n: int, dim: int, m: int, centroids: int) -> int:
    return n * (m + 8) + centroids + m * 256 * (dim // m) * 4


def _pq_sizes(dim: int) -> list[int]:
    """The IVF-PQ code sizes that divide ``dim``, most accurate first."""
    return [m for m in PQ_BYTES if dim % m == 0]


KMEANS_ITERATIONS = 25  # FAISS's default for an IVF quantizer
ESTIMATE_NPROBE = 16  # real photos need more probes than the synthetic benchmark's 2; estimates assume 16


@dataclass(frozen=True)
class IndexCandidate:
    factory: str
    est_bytes: int
    build_s: float  # training, filling and the recall check, at this machine's measured flop rate
    query_ms: float  # one query, at that rate
    fits: bool


def index_candidates(n: int, dim: int, ram_budget: int, flops: float) -> list[IndexCandidate]:
    """Every index kind the plan chooses among, with its memory and time (autofaiss's estimate-first rule).

    Times are flop counts over ``flops`` (multiply-adds x 2 per second, measured on this machine by
    :func:`geo.core.runtime.matmul_flops`): k-means over 64 vectors a list, two assignment passes (list sizes,
    then filling), the exact search behind recall@10 on 1,000 queries, and a query's probed lists.
    """
    exact = 2 * 1000 * n * dim
    out = [IndexCandidate("Flat", n * dim * 4, (exact + n * dim) / flops, 2 * n * dim / flops * 1e3,
                          n * dim * 4 <= ram_budget)]
    nlist, quantizer, centroids = ivf_layout(n, dim)
    train = 2 * KMEANS_ITERATIONS * nlist * TRAIN_PER_LIST * nlist * dim
    assign = 2 * 2 * n * nlist * dim
    probe_ms = 2 * (nlist + ESTIMATE_NPROBE * n / nlist) * dim / flops * 1e3
    raw = _ivf_flat_bytes(n, dim, centroids)
    out.append(IndexCandidate(f"{quantizer},Flat", raw, (train + assign + exact) / flops, probe_ms, raw <= ram_budget))
    for m in _pq_sizes(dim):
        est = _ivf_pq_bytes(n, dim, m, centroids)
        pq_train = 2 * KMEANS_ITERATIONS * 256 * nlist * TRAIN_PER_LIST * dim
        out.append(IndexCandidate(f"{quantizer},PQ{m}", est, (train + pq_train + assign + exact) / flops,
                                  2 * (nlist * dim + ESTIMATE_NPROBE * n / nlist * m) / flops * 1e3, est <= ram_budget))
    return out


def gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


class KnnIndex:
    """A FAISS inner-product index over L2-normalised embeddings and its rows' metadata, in FAISS id order.

    ``meta``: the rows' ``id``, ``path``, ``lat`` and ``lon``, a DataFrame or numpy columns (:mod:`geo.core.tables`:
    what :meth:`load` reads, without pandas)."""

    def __init__(self, index, meta: Any, infos: dict[str, Any] | None = None):
        rows = len(meta["id"])
        if index.ntotal != rows:
            raise BundleError(f"kNN index holds {index.ntotal} vectors for {rows} embedding rows "
                              "(index and shards are out of step; rebuild with --force knn_index)")
        self.index = index
        self.ids = text_objects(meta["id"])
        self.paths = text_objects(meta["path"])
        self.lat = np.asarray(meta["lat"], np.float64)
        self.lon = np.asarray(meta["lon"], np.float64)
        self.infos = infos or {}
        self._params = None  # FAISS search parameters (an ID selector: see excluding)

    @property
    def ntotal(self) -> int:
        return len(self.ids)

    @classmethod
    def from_arrays(cls, emb: np.ndarray, meta: pd.DataFrame) -> "KnnIndex":
        """An exact index in memory (fusion's out-of-fold folds, small galleries)."""
        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(np.ascontiguousarray(emb, np.float32))
        return cls(index, meta.reset_index(drop=True))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, rows) [n, min(k, ntotal)]; rows are -1 where FAISS found fewer."""
        q, k = np.ascontiguousarray(queries, np.float32), max(1, min(int(k), self.ntotal))
        if self._params is None:
            return self.index.search(q, k)
        return self.index.search(q, k, params=self._params[0])

    def release(self) -> None:
        """Drop the FAISS index and keep the rows' metadata: for a caller whose searches are all done (and
        memoised), so that a large index does not stay in memory beside what comes next."""
        self.index, self._params = None, None

    def excluding(self, rows: np.ndarray) -> "KnnIndex":
        """The same index, searched as if ``rows`` were not in it (a FAISS ID selector; nothing is copied).

        Fusion scores a large gallery's held-out photographers against the built
        index: their own photos must not be found.
        """
        batch = faiss.IDSelectorBatch(np.asarray(rows, np.int64))
        return self._selecting(faiss.IDSelectorNot(batch), 1.0, batch)

    def within(self, rows: np.ndarray) -> "KnnIndex":
        """The same index, searched as if it held only ``rows`` (a query-time constraint: the photos inside it).
        An IVF index visits ``nprobe`` times as many lists as the share of rows inside is small (all of them for a
        tiny share), so a search still meets about as many candidates as an unconstrained one."""
        return self._selecting(faiss.IDSelectorBatch(np.asarray(rows, np.int64)), self.ntotal / max(len(rows), 1))

    def _selecting(self, sel, widen: float, *keep) -> "KnnIndex":
        out = copy.copy(self)
        out._params = selected(self.index, sel, widen, *keep)
        return out

    def save(self, bundle: Bundle) -> tuple[list[str], dict[str, Any]]:
        atomic_write_faiss(bundle.path(INDEX_FILE), self.index)
        infos = {**self.infos, "bytes": bundle.path(INDEX_FILE).stat().st_size}
        atomic_write_json(bundle.path(INFOS_FILE), infos)
        return [INDEX_FILE, INFOS_FILE], infos

    @classmethod
    def load(cls, bundle: Bundle, use_gpu: bool | None = None, mmap: bool | None = None) -> "KnnIndex":
        """Read the index (onto the GPU(s) when FAISS has any and ``use_gpu`` is not False; memory-mapped when
        ``mmap``, or by default when it is bigger than half the memory budget) and the rows' metadata."""
        return cls(read_index(bundle, use_gpu, mmap), EmbeddingReader(bundle).read_columns(META_COLUMNS),
                   bundle.stage(STAGE))


def read_index(bundle: Bundle, use_gpu: bool | None = None, mmap: bool | None = False):
    """The stored FAISS index with its tuned nprobe, on the GPU(s) when FAISS has any and ``use_gpu`` allows.

    ``mmap`` opens it memory-mapped and read-only, so an index bigger than memory is paged in as searches
    touch it (None: when the file is bigger than half of :func:`geo.plan.default_memory`).
    """
    path = bundle.path(INDEX_FILE)
    if mmap is None:
        mmap = path.exists() and path.stat().st_size > default_memory() // 2
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0)
    except RuntimeError as e:
        raise BundleError(f"{path}: not a readable FAISS index ({str(e).splitlines()[0]})") from None
    nprobe = bundle.stage(STAGE).get("nprobe")
    if nprobe:
        faiss.extract_index_ivf(index).nprobe = nprobe
    if (use_gpu is None or use_gpu) and gpu_count() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    return index


def list_sizes(empty: np.ndarray, shard: str) -> np.ndarray:
    """How many of one shard's vectors each inverted list of the trained index gets (int64 [nlist])."""
    index = faiss.deserialize_index(empty)  # held: the extracted IVF view does not keep it alive
    ivf = faiss.extract_index_ivf(index)
    counts = np.zeros(ivf.nlist, np.int64)
    for _, emb in shard_pieces(Path(shard), columns=[]):
        _, lists = ivf.quantizer.search(emb, 1)
        counts += np.bincount(lists[:, 0], minlength=ivf.nlist)
    return counts


def _reserve(index, sizes: np.ndarray) -> None:
    """Give each inverted list its final capacity up front: appended lists otherwise grow by doubling, and the
    slack costs about a third more memory than the vectors themselves (measured at 200K x 512)."""
    invlists = faiss.extract_index_ivf(index).invlists
    for lst, size in enumerate(sizes.tolist()):
        invlists.resize(lst, size)
        invlists.resize(lst, 0)


def fill_shard(empty: np.ndarray, shard: str) -> np.ndarray:
    """The trained, empty index (serialised) filled with one embedding shard's vectors, serialised: one unit of
    population, run in this process or as a cluster task (:func:`geo.cluster.ray_map`)."""
    index = faiss.deserialize_index(empty)
    for _, emb in shard_pieces(Path(shard), columns=[]):
        index.add(emb)
    return faiss.serialize_index(index)


def _fill(index, empty: np.ndarray, shards: list[str], flat: bool,
          mapper: Callable[[Callable, list], Iterable] | None) -> None:
    """Every shard's vectors into ``index``, in shard order. In this process they are added directly: a filled
    copy of the index per shard, its serialised bytes and their deserialised twin (what crossing to a cluster
    task needs) were about three shards of memory on top of the index, 0.75 GB at 150K x 1280."""
    if mapper is None:
        for shard in shards:
            for _, emb in shard_pieces(Path(shard), columns=[]):
                index.add(emb)
        return
    for part in mapper(functools.partial(fill_shard, empty), shards):
        part = faiss.deserialize_index(part)
        index.merge_from(part, 0 if flat else index.ntotal)  # flat indices number rows themselves
        del part
        release_unused()  # a shard's filled copy and its bytes, given back before the next shard's


def fit_knn(reader: EmbeddingReader, config: KnnConfig = KnnConfig(), log: Callable[[str], None] = print,
            mapper: Callable[[Callable, list], Iterable] | None = None) -> KnnIndex:
    """Plan, train on a sample, fill shard by shard, tune nprobe for the recall target, measure.

    ``mapper`` None: this process adds each shard's vectors to the index itself. A mapper (Ray tasks with
    ``--ray``): each shard fills a copy of the trained index there, merged here in shard order, the same index
    as adding the shards one after another.
    """
    n = reader.count
    if n == 0:
        raise BundleError(f"{reader.bundle.root}: no embeddings to index (every input failed; see errors.parquet)")
    dim = next(reader.iter(columns=[], batch_rows=1))[1].shape[1]
    plan = plan_index(n, dim, index_budget() if config.ram_budget is None else parse_bytes(config.ram_budget),
                      config.exact_max)
    log(f"faiss: {plan.describe()}")
    t0 = time.perf_counter()
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind != "flat":
        train = reader.sample(plan.nlist * TRAIN_PER_LIST)
        log(f"faiss: training on {len(train):,} vectors")
        index.train(train)
    empty = faiss.serialize_index(index)
    index = faiss.deserialize_index(empty)  # the same class as the parts (the factory's may differ), as merging needs
    shards = [str(s) for s in reader.shards]
    if plan.kind != "flat":
        _reserve(index, sum((mapper or map)(functools.partial(list_sizes, empty), shards)))
    _fill(index, empty, shards, plan.kind == "flat", mapper)
    build_s = time.perf_counter() - t0

    queries = reader.sample(min(1000, n), seed=1)
    k = config.recall_k
    nprobe = _tune_nprobe(index, queries, k, config.recall_target, reader) if plan.kind != "flat" else 0
    recall = _recall(index, queries, k, reader) if plan.kind != "flat" else 1.0
    infos = {
        **asdict(plan),
        "ntotal": int(index.ntotal),
        "nprobe": nprobe,
        f"recall@{k}": round(recall, 4),
        "recall_queries": len(queries),
        "median_query_ms": round(_median_latency_ms(index, queries[:200]), 3),
        "build_seconds": round(build_s, 2),
        "faiss_version": faiss.__version__,
        "gpus": gpu_count(),
    }
    log(f"faiss: {infos['ntotal']:,} vectors, recall@{k} {infos[f'recall@{k}']}, "
        f"median query {infos['median_query_ms']} ms")
    return KnnIndex(index, reader.read_columns(META_COLUMNS), infos)


def _exact_neighbours(queries: np.ndarray, k: int, reader: EmbeddingReader) -> np.ndarray:
    """Exact top-k ids by streaming the shards (the ground truth for recall); FAISS's blocked exact search per
    piece keeps memory at a few [queries, k] arrays, not a [queries, piece] score matrix."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    start = 0
    for _, emb in reader.iter(columns=[]):
        s, i = faiss.knn(queries, emb, min(k, len(emb)), metric=faiss.METRIC_INNER_PRODUCT)
        cat_s, cat_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i + start], 1)
        top = np.argsort(-cat_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cat_s, top, 1), np.take_along_axis(cat_i, top, 1)
        start += len(emb)
    return best_i


def _recall(index, queries: np.ndarray, k: int, reader: EmbeddingReader, truth: np.ndarray | None = None) -> float:
    truth = _exact_neighbours(queries, k, reader) if truth is None else truth
    _, got = index.search(queries, k)
    return float(np.mean([len(set(t) & set(g)) / k for t, g in zip(truth, got)]))


def _tune_nprobe(index, queries: np.ndarray, k: int, target: float, reader: EmbeddingReader) -> int:
    """Smallest power-of-two nprobe reaching the recall target (autofaiss's tuning, simplified)."""
    truth = _exact_neighbours(queries, k, reader)
    ivf = faiss.extract_index_ivf(index)
    nprobe = 1
    while True:
        ivf.nprobe = nprobe
        if _recall(index, queries, k, reader, truth) >= target or nprobe >= ivf.nlist:
            return nprobe
        nprobe *= 2


def _median_latency_ms(index, queries: np.ndarray, k: int = 50) -> float:
    times = []
    for q in queries:
        t = time.perf_counter()
        index.search(q[None], min(k, index.ntotal))
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def selected(index, sel, widen: float = 1.0, *keep) -> tuple:
    """(FAISS search parameters that search ``index`` through the ID selector ``sel``, then ``sel`` and ``keep``:
    the selectors must outlive the parameters that point at them). An IVF index visits ``widen`` times as many
    lists (at most all of them)."""
    ivf = faiss.try_extract_index_ivf(index)
    params = (faiss.SearchParametersIVF(sel=sel, nprobe=min(ivf.nlist, int(np.ceil(ivf.nprobe * widen))))
              if ivf is not None else faiss.SearchParameters(sel=sel))
    return (params, sel, *keep)
