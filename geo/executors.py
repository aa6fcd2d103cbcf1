"""Where a build's parallel parts run: chosen once, where the build starts, and passed down.

Two parts of a build can spread out: making the embedding shards and filling
the FAISS index shard by shard. An :class:`Executor` does both. The build picks
one from ``--ray`` (:func:`executor_for`) before anything runs, the way
clip-retrieval picks its distributor once; stages never ask which one it is:
they take the executor's ``mapper`` as a plain callable (None: this process does the work itself).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol

from geo.cluster import RayExecutor
from geo.models.registry import Backbone
from geo.stages.embed import EmbedConfig, run_embedding_stage
from geo.store.bundle import Bundle

if TYPE_CHECKING:
    import pandas as pd

Mapper = Callable[[Callable[[Any], Any], list], Iterable[Any]]
Log = Callable[[str], None]


class Executor(Protocol):
    """Runs the embedding shards and the per-shard work of a build."""

    name: str

    def embed(self, bundle: Bundle, rows: pd.DataFrame, backbone: Backbone, cfg: EmbedConfig, progress: bool,
              first_shard: int) -> tuple[list[Path], dict[str, Any]]:
        """Embed every row not yet in a finished shard; (every finished shard's files, the stage's info)."""

    mapper: Mapper | None
    """``mapper(fn, items)`` spreads per-shard work and returns results in the items' order; None: this process
    does it itself, with nothing to serialise (a local kNN fill adds each shard straight into the index)."""


class LocalExecutor:
    """This process: the backbone the driver loaded, decoding workers of its own, the builtin ``map``."""

    name = "local"

    def embed(self, bundle: Bundle, rows: pd.DataFrame, backbone: Backbone, cfg: EmbedConfig, progress: bool,
              first_shard: int) -> tuple[list[Path], dict[str, Any]]:
        return run_embedding_stage(bundle, rows, backbone, cfg, progress, first_shard)

    mapper = None


LOCAL = LocalExecutor()


def executor_for(ray: str | None, device: str, precision: str, log: Log) -> Executor:
    """The build's one executor: this process, or the Ray cluster at ``ray`` (connected here, once)."""
    if ray is None:
        return LOCAL
    executor = RayExecutor(ray, device, precision)
    log(f"ray: connected ({ray}); embedding shards and FAISS population run on the cluster")
    return executor
