"""Run a benchmark suite against an index and score it.

The index is anything with ``locate_modes(paths, modes, crops=...) -> [list[Answer] per mode]``
(``geo.open_index`` returns one), which keeps the runner testable with a fake.
Missing photos and photos the index could not read are counted and reported,
never silently taken out of the denominator.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from geo.core.answer import Answer
from geo.core.progress import bar as progress_bar
from geo.eval.leaks import NEAR_DUPLICATE, REASONS, find_leaks, leak_counts
from geo.eval.metrics import breakdown, label_accuracies, distances_km, summarize
from geo.eval.suites import Suite, SuiteError, resolve_images
from geo.data.embedding_table import EmbeddingTable
from geo.store.embeddings import EmbeddingReader
from geo.store.predictions import ShardedWriter, answers_to_frame, conform, write_predictions

if TYPE_CHECKING:
    import pandas as pd


class Locator(Protocol):
    default_mode: str

    def locate_modes(self, images: Sequence[str], modes: Sequence[str | None], crops: int = ...) -> list[list[Answer]]: ...


@dataclass
class BenchResult:
    suite: str
    meta: Path
    predictions: pd.DataFrame  # every located or failed row, in the predictions schema
    missing: list[str] = field(default_factory=list)  # query ids whose image is not on disk
    resumed: int = 0  # rows taken from an earlier run of the same --out
    leak_checks: list[str] = field(default_factory=list)  # the leak reasons mark_leaks looked for (none: not run)

    @property
    def failed(self) -> pd.DataFrame:
        return self.predictions[self.predictions["error"].notna()]

    @property
    def modes(self) -> list[str]:
        """The modes scored, in the order they were asked for."""
        return list(dict.fromkeys(self.predictions["mode"].dropna()))

    def summary(self, distance: str = "haversine", ci: bool = True, n_boot: int = 1000,
                exclude_leaks: bool = False, mode: str | None = None) -> dict[str, Any]:
        """The field's metrics, for one ``mode``'s rows (all rows when None: a one-mode run). Leaked queries
        (the ``leak`` column, see :mod:`geo.eval.leaks`) are scored with the rest and also left out in
        ``leaks.without``; ``exclude_leaks`` scores only the new ones."""
        import pandas as pd

        preds = self.predictions if mode is None else self.predictions[self.predictions["mode"] == mode]
        leaked = preds["leak"].notna() if "leak" in preds.columns else pd.Series(False, index=preds.index)
        out = self._score(preds[~leaked] if exclude_leaks else preds, distance, ci, n_boot)
        failed = preds[preds["error"].notna()]
        out.update(suite=self.suite, meta=str(self.meta), distance=distance, resumed=self.resumed,
                   missing_ids=self.missing[:20], failed=failed[["query_id", "error"]].head(20).to_dict("records"))
        out["leaks"] = {"n": int(leaked.sum()), "by_reason": leak_counts(preds["leak"]) if leaked.any() else {},
                        "excluded": exclude_leaks, "checked": list(self.leak_checks)}
        if leaked.any() and not exclude_leaks:
            out["leaks"]["without"] = self._score(preds[~leaked], distance, False, n_boot)
        return out

    def _score(self, preds: pd.DataFrame, distance: str, ci: bool, n_boot: int) -> dict[str, Any]:
        ok = preds[preds["error"].isna()]
        d = distances_km(ok["true_lat"], ok["true_lon"], ok["pred_lat"], ok["pred_lon"], distance)
        out = summarize(d, n_missing=len(self.missing), n_failed=int(preds["error"].notna().sum()), ci=ci,
                        n_boot=n_boot)
        out.update(label_accuracies(ok))
        if ok["scene"].notna().any():
            out["by_scene"] = breakdown(d, ok["scene"].tolist(), ci=False)
        return out


def run_embeddings(index: Any, table: EmbeddingTable, *, modes: Sequence[str | None] = (None,),
                   out: str | Path | None = None, index_id: str | None = None) -> BenchResult:
    """Score precomputed query embeddings against their own coordinates (``geo bench custom --embeddings``),
    in each of ``modes`` (None: the index's best built mode).

    A row whose embedding or coordinates are unusable is a failed query with its
    reason (counted, never dropped from the denominator silently).
    """
    import pandas as pd

    frames = []
    for mode in dict.fromkeys(m or index.default_mode for m in modes):
        answers, truth = index.locate_table(table, mode=mode)
        frames.append(answers_to_frame(answers, [a.id for a in answers], [tuple(t) for t in truth], mode=mode,
                                       suite="custom", index_id=index_id))
    preds = pd.concat(frames, ignore_index=True)
    if preds.empty:
        raise SuiteError(f"{table.path}: nothing to score")
    if out:
        write_predictions(out, preds)
    return BenchResult("custom", table.path, conform(preds))


def mark_leaks(index: Any, result: BenchResult, near_duplicate: float = NEAR_DUPLICATE) -> None:
    """Fill ``result.predictions["leak"]`` against the index's gallery (ids, recorded paths, near-duplicates,
    photographers where both sides name them). An index without a gallery (a test's fake) marks nothing."""
    knn = getattr(index, "knn", None)
    preds = result.predictions
    if knn is None or preds.empty:
        return
    groups = None
    bundle = index.bundle
    column = next((bundle.manifest["stages"][s].get("group_column") for s in ("cells", "gallery", "fusion")
                   if bundle.has_stage(s) and bundle.manifest["stages"][s].get("group_column")), None)
    if column is not None and preds["photographer"].notna().any():
        reader = EmbeddingReader(bundle)
        if column in reader.columns:
            groups = reader.read_meta([column])[column].to_numpy(dtype=object)
    preds["leak"] = find_leaks(preds, knn.ids, knn.paths, preds["photographer"], groups, near_duplicate)
    result.leak_checks = [r for r in REASONS if r != "same photographer" or groups is not None]


def index_id_of(index: Any, index_dir: str | Path | None) -> str | None:
    """A stable label for the index: its directory plus the bundle's creation time when known."""
    created = getattr(getattr(index, "bundle", None), "manifest", {}).get("created") if index is not None else None
    parts = [str(Path(index_dir).resolve()) if index_dir else None, created]
    return "@".join(p for p in parts if p) or None


def run_suite(
    index: Locator,
    suite: Suite,
    images: str | Path,
    *,
    meta: str | Path | None = None,
    modes: Sequence[str | None] = (None,),
    crops: int = 1,
    limit: int | None = None,
    out: str | Path | None = None,
    batch_size: int = 32,
    shard_rows: int = 512,
    index_id: str | None = None,
    progress: bool = True,
) -> BenchResult:
    """Locate every photo of the suite in each of ``modes`` and return the predictions (one row per photo
    and mode; each photo is embedded once for all modes).

    A mode None is the index's best built mode. ``limit`` keeps the first N
    rows of the metadata (deterministic, so two runs with the same limit score
    the same photos). With ``out`` the run is resumable: a (photo, mode) pair
    already in ``out`` or its shards is not located again, so adding a mode to
    an earlier run only computes the new mode.
    """
    import pandas as pd
    images = Path(images)
    modes = list(dict.fromkeys(m or index.default_mode for m in modes))
    rows, meta_path = suite.load(images, Path(meta) if meta else None)
    if limit is not None:
        rows = rows.head(limit)
    rows = rows.assign(image=resolve_images(rows, images).to_numpy())
    missing = rows.loc[rows["image"].isna(), "query_id"].tolist()
    todo = rows[rows["image"].notna()]

    writer = ShardedWriter(out) if out else None
    done = writer.done_keys() if writer else set()
    wanted_per_row = [[m for m in modes if (q, m) not in done] for q in todo["query_id"]]
    resumed = sum(len(modes) - len(w) for w in wanted_per_row)
    # photos needing the same modes go through together; a fresh run is one group with every mode
    groups: dict[tuple[str, ...], list[int]] = {}
    for pos, w in enumerate(wanted_per_row):
        if w:
            groups.setdefault(tuple(w), []).append(pos)

    collected: list[pd.DataFrame] = []
    pending: list[pd.DataFrame] = []
    label = f"{suite.name} ({', '.join(modes)})"
    bar = progress_bar(len(todo), label, "img", len(todo) - sum(map(len, groups.values())), progress)
    for group_modes, positions in groups.items():
        for start in range(0, len(positions), batch_size):
            batch = todo.iloc[positions[start : start + batch_size]]
            per_mode = index.locate_modes(batch["image"].tolist(), list(group_modes), crops=crops)
            for mode, answers in zip(group_modes, per_mode):
                if len(answers) != len(batch):
                    raise RuntimeError(f"index returned {len(answers)} answers for {len(batch)} images")
                frame = answers_to_frame(
                    answers, batch["query_id"].tolist(), list(zip(batch["true_lat"], batch["true_lon"])),
                    mode=mode, suite=suite.name, index_id=index_id,
                    extra={"scene": batch["scene"].tolist(), "country": batch["country"].tolist(),
                           "photographer": batch["photographer"].tolist()},
                )
                collected.append(frame)
                pending.append(frame)
            if writer and sum(map(len, pending)) >= shard_rows:
                writer.append(pd.concat(pending, ignore_index=True))
                pending = []
            bar.update(len(batch))
    bar.close()

    if writer:
        if pending:
            writer.append(pd.concat(pending, ignore_index=True))
        allrows = writer.finish()
        wanted = set(rows["query_id"])
        preds = allrows[allrows["query_id"].isin(wanted) & allrows["mode"].isin(modes)].reset_index(drop=True)
    else:
        preds = conform(pd.concat(collected, ignore_index=True)) if collected else conform(pd.DataFrame())
    if preds.empty and not missing:
        raise SuiteError(f"{meta_path}: nothing to score")
    return BenchResult(suite.name, meta_path, preds, missing, resumed)
