"""What a build will do and need, before it does anything (``geo build-index --dry-run``).

autofaiss's rule: estimate memory first and fail fast with an actionable
message, rather than fail after an hour. Each stage's plan names what it will
build and the memory and disk it needs, from the gallery's size and dimension
alone; :func:`check` refuses a build whose peak exceeds the memory budget
(``--memory``, default a safe share of this machine), saying which option to change.

``--memory`` is the one memory option: the FAISS index's budget, which picks Flat / IVF-Flat / IVF-PQ, is
:func:`index_budget` of it (half: the index is held beside the shards being read, and served beside the
model) unless a ``--config`` file sets ``knn.ram_budget``; a bundle records the budget it was built with.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from geo.core.sizes import SAFE_SHARE, default_memory, human_bytes, index_budget, parse_bytes
from geo.stages.cells.partition import default_taus
from geo.stages.cells.train import VAL_LOSS_PHOTOS
from geo.stages.knn import TRAIN_PER_LIST, index_candidates, plan_index
from geo.store.bundle import BundleError


GALLERY_POINT_BYTES = 513 * 4  # a gallery point's encoded vector (512-d features and its prior column)
RERANK_QUERY_BYTES = 16 << 10  # the reranker's design rows of one scored photo: ~60 candidates x ~60 float32 features
POINT_ROW_BYTES = 48  # its row in gallery/points.parquet (lat, lon, source), uncompressed
# What one build process holds, fitted to the one-command builds of benchmarks/RESULTS.md ("The one-command
# build's memory, final"): 147K x 1280 and 1M x 512, each stage's peak within 11 % at both sizes.
PROCESS_BYTES = 650_000_000  # the process before any data: torch, FAISS, Arrow, shapely
META_ROW_BYTES = 100  # every photo's coordinates and photographer, held by the trained stages and fusion
CELLS_PER_SQRT_PHOTO = 11  # adaptive cells grow like sqrt(n) (default_taus): 4.2K at 147K, 10.2K at 1M
HEADS_WORKING = 3 * VAL_LOSS_PHOTOS * 4  # bytes per cell of the heads' validation: its photos' logits, ~3 copies
STAGE_OVERHEAD = 400_000_000  # loaded stages, evidence, allocator slack: what no formula above names


@dataclass
class StagePlan:
    stage: str
    does: str
    memory: int  # bytes the stage holds at its peak, beside the process itself (PROCESS_BYTES)
    disk: int = 0  # bytes it writes
    details: list[str] = field(default_factory=list)  # printed under the line (the index candidates)

    def line(self) -> str:
        disk = f", writes ~{human_bytes(self.disk)}" if self.disk else ""
        return "\n".join([f"{self.stage:>10}: {self.does}; holds ~{human_bytes(self.memory)}{disk}",
                          *(f"{'':>12}{d}" for d in self.details)])


def plan_build(n: int, dim: int, ram_budget: str | int | None, exact_max: int, gallery_points: int, gallery_rounds: int,
               round_photos: int, fusion_folds: int, single_split_above: int, max_queries: int,
               stages: tuple[str, ...], train_photos: int, shard_rows: int, flops: float | None = None,
               extra_points: int = 0) -> list[StagePlan]:
    """The plan of every stage for ``n`` embeddings of ``dim`` floats, written ``shard_rows`` to a shard (ingest
    holds one, the kNN stage two); with ``flops`` (this machine's speed, for
    ``--dry-run``), the kNN plan also prices every candidate index. ``extra_points``: the GPS gallery's own
    points beside the photos' places (GeoCLIP's 100K, or a --gps-gallery file's rows)."""
    emb, shard = n * dim * 4, min(n, shard_rows) * dim * 4
    # a shard decoded, as a matrix, normalised in place and written
    out = [StagePlan("embeddings", f"{n:,} x {dim} float32 in Parquet shards", 3 * shard + STAGE_OVERHEAD // 2, emb)]
    if "knn_index" in stages:
        budget = index_budget() if ram_budget is None else parse_bytes(ram_budget)
        p = plan_index(n, dim, budget, exact_max)
        details = []
        if flops is not None:
            details.append(f"candidates (times at this machine's {flops / 1e9:.0f} GFLOP/s; query assumes nprobe 16):")
            for c in index_candidates(n, dim, budget, flops):
                mark = "chosen" if c.factory == p.factory else ("fits" if c.fits else "over the index budget")
                details.append(f"{c.factory:<22} {human_bytes(c.est_bytes):>9}  build ~{_duration(c.build_s):>7}  "
                               f"query ~{c.query_ms:.2f} ms  {mark}")
        out.append(StagePlan("knn_index", p.describe(), p.est_bytes + 2 * shard + min(n, p.nlist * TRAIN_PER_LIST) * dim * 4,
                             p.est_bytes, details))
    if n >= 50:
        index = out[-1].disk if "knn_index" in stages else emb
        out += _trained_plans(n, dim, stages, train_photos, gallery_points, gallery_rounds, round_photos, extra_points,
                              fusion_folds, single_split_above, max_queries, index)
    return out


def _trained_plans(n: int, dim: int, stages: tuple[str, ...], train_photos: int, gallery_points: int,
                   gallery_rounds: int, round_photos: int, extra_points: int, fusion_folds: int,
                   single_split_above: int, max_queries: int, index: int) -> list[StagePlan]:
    """The cells, gallery and fusion stages' plans. They hold every photo's metadata and the training sample:
    float16 on the large path (fusion scores the built stages), float32 where fusion refits them per fold."""
    out = []
    tau_min, tau_max = default_taus(n)
    large = n > single_split_above
    sample = min(n, train_photos)
    held = sample * dim * (2 if large else 4) + n * META_ROW_BYTES
    on = f"all {n:,} photos" if sample == n else f"a sample of {sample:,} photos"
    if "cells" in stages:
        cells = int(CELLS_PER_SQRT_PHOTO * n ** 0.5)
        out.append(StagePlan("cells", f"adaptive S2 partitions (tau_min {tau_min}, tau_max {tau_max}) of every "
                             f"photo, linear heads trained on {on}", held + cells * HEADS_WORKING + STAGE_OVERHEAD,
                             n * 64))
    if "gallery" in stages:
        points = min(n, gallery_points) + extra_points
        steps = gallery_rounds * min(n, round_photos) // 256
        # every file it writes: the points' FAISS vectors and table, and the image projection
        written = points * (GALLERY_POINT_BYTES + POINT_ROW_BYTES) + dim * 512 * 4
        out.append(StagePlan("gallery", f"up to {points:,} GPS points, at most {steps:,} training steps on {on}",
                             held + 3 * points * GALLERY_POINT_BYTES + STAGE_OVERHEAD, written))
    if "fusion" in stages:
        if not large:
            how = (f"{fusion_folds} photographer folds, the signal stages refitted in memory per fold, "
                   "then a grid over the signals")
            memory = held + 2 * n * dim * 4 + STAGE_OVERHEAD  # the folds refit the kNN index and heads
        else:
            how = (f"~{max_queries:,} photos of held-out photographers scored against the built stages "
                   "without them (no refit), then a grid over the signals")
            memory = index + n * META_ROW_BYTES + 2 * min(n, gallery_points) * GALLERY_POINT_BYTES \
                + max_queries * (dim * 4 + RERANK_QUERY_BYTES) + STAGE_OVERHEAD
        out.append(StagePlan("fusion", how, memory, 1 << 20))
    return out


def process_peak(plans: list[StagePlan]) -> int:
    """What the one build process holds at its peak: itself and its largest stage (the stages run one at a time
    and hand back what they freed: geo.core.memory)."""
    return PROCESS_BYTES + max(p.memory for p in plans)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def check(plans: list[StagePlan], memory: int) -> None:
    """Refuse a build whose peak (its largest stage in the process) needs more than ``memory`` bytes, naming
    the stage and the options."""
    worst = max(plans, key=lambda p: p.memory)
    if process_peak(plans) > memory:
        raise BundleError(
            f"the {worst.stage} stage needs about {human_bytes(process_peak(plans))} with the process, more than "
            "the memory budget of "
            f"{human_bytes(memory)}: raise --memory (this machine: {human_bytes(default_memory() / SAFE_SHARE)}), "
            "or --skip the trained stages"
        )
