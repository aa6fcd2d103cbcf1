"""Command line for benchmarks: ``geo bench SUITE``, ``geo bench score FILE``, ``geo sql``, ``geo report``.

``register(app)`` is the only entry point; ``geo/cli/__init__.py`` calls it. One
command is generated per suite in the registry (rather than a free SUITE
argument) so that ``geo bench score FILE`` and ``geo bench im2gps3k ...``
coexist and ``--help`` lists the suites.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from geo.cli.common import fail, print_json
from geo.cli.options import Ci, Distance, EmbeddingColumn, Embeddings, Index, Json, Quiet
from geo.eval.metrics import (
    DISTANCES,
    THRESHOLDS_KM,
    breakdown,
    label_accuracies,
    distances_km,
    geoestimation_footer,
    summarize,
)
from geo.eval.published import comparison_table, published_json
from geo.eval.report import build_report, groups_text, report_text, summary_text
from geo.data.embedding_table import EmbeddingTable
from geo.eval.regions import format_region_table, mark_regions, region_table
from geo.eval.runner import index_id_of, mark_leaks, run_embeddings, run_suite
from geo.eval.sql import run_sql
from geo.eval.suites import SUITES, SuiteError, get_suite
from geo.query.index import open_index
from geo.store.bundle import bundle_containing
from geo.store.geojson import write_geojson
from geo.store.predictions import read_predictions, read_scored_file, write_predictions


def _check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise ValueError(f"--distance must be one of {', '.join(DISTANCES)}, not {distance!r}")


def _leak_text(leaks: dict[str, Any], per_mode: bool = False) -> str:
    """The plain warning when some queries are not new to the gallery, with the scores without them
    (``per_mode``: those are printed under each mode instead)."""
    reasons = ", ".join(f"{r} {n}" for r, n in leaks["by_reason"].items())
    if leaks["excluded"]:
        return (f"leakage: {leaks['n']} queries are not new to this gallery ({reasons}); "
                "they were left out of the scores above (--exclude-leaks)")
    w = leaks["without"]
    if not w["n"]:
        return (f"warning: leakage: every query is in or near this gallery ({reasons}): the scores above are "
                "memory, not geolocation; there is nothing new to score.")
    warning = (f"warning: leakage: {leaks['n']} queries are not new to this gallery ({reasons}); they are answered "
               "partly from memory and inflate the scores above.")
    if per_mode:
        return warning + " --exclude-leaks scores only the new ones."
    return f"{warning}\n{_without_line(w)}. --exclude-leaks scores only the new ones."


def _no_leak_text(leaks: dict[str, Any], n: int) -> str:
    """The clean split said, not left to silence: 0 leaks among the queries, and which checks found none."""
    return (f"leakage: 0 leaks: none of the {n} queries is in or near this gallery (checked: "
            f"{', '.join(leaks['checked'])}" + ("" if "same photographer" in leaks["checked"] else
                                                "; photographers not compared, as one side names none") + ")")


def _without_line(w: dict[str, Any]) -> str:
    without = " ".join(f"{t}km {100 * w['acc'][str(t)]:.2f}%" for t in THRESHOLDS_KM)
    return f"without them (n={w['n']}): {without}, median {w['median_km']:.1f} km"


def _leak_parts(leaks: dict[str, Any], n_total: int, per_mode: bool = False) -> list[str]:
    """What a run says of leakage: that the checks found none, or the leaks (once, whatever the modes)."""
    if leaks.get("n"):
        return [_leak_text(leaks, per_mode=per_mode)]
    return [_no_leak_text(leaks, n_total)] if leaks.get("checked") else []


def _human(summary: dict[str, Any], suite: str | None, label: str) -> str:
    parts = [summary_text(summary)]
    if summary.get("by_scene"):
        parts.append(groups_text("scene", summary["by_scene"]))
    leaks = summary.get("leaks") or {}
    parts += _leak_parts(leaks, summary["n_total"])
    if leaks.get("n"):
        label = f"{label} (leaks excluded)" if leaks["excluded"] else f"{label} ({leaks['n']} leaked)"
    table = comparison_table(suite, summary, label) if suite else ""
    if table:
        parts.append(f"published results on {suite} (percent):\n{table}")
    return "\n\n".join(parts)


def _modes_human(scored: dict[str, dict[str, Any]], suite: str) -> str:
    """Every mode of one run: each mode's summary (and its scores without leaked queries), the leakage
    warning once (a leak is a property of the photo), and one table with a row per mode above the
    published results."""
    parts = []
    for m, s in scored.items():
        w = (s.get("leaks") or {}).get("without")
        parts.append(f"[{m}]\n{summary_text(s)}" + (f"\n{_without_line(w)}" if w and w["n"] else ""))
    first = next(iter(scored.values()))
    leaks = first.get("leaks") or {}
    parts += _leak_parts(leaks, first["n_total"], per_mode=True)
    mark = (" (leaks excluded)" if leaks["excluded"] else f" ({leaks['n']} leaked)") if leaks.get("n") else ""
    table = comparison_table(suite, None, more={f"this index, {m}{mark}": s for m, s in scored.items()})
    if table:
        parts.append(f"published results on {suite} (percent):\n{table}")
    return "\n\n".join(parts)


# ---------------------------------------------------------------- geo bench score
def _scenes(suite: str, meta: Path | None, ids) -> Any:
    """Scene labels from the suite's metadata, so a bare result file still gets a per-scene breakdown.

    Best effort when the metadata is not given and cannot be found (the
    scores do not depend on it); an explicit ``--meta`` must be readable.
    """
    try:
        rows, _ = get_suite(suite).load(Path.cwd(), meta)
    except SuiteError:
        if meta is not None:
            raise
        return None
    return ids.map(dict(zip(rows["query_id"], rows["scene"])))


ROLES = ("true_lat", "true_lon", "pred_lat", "pred_lon")


def _roles(columns: list[str]) -> dict[str, str | None]:
    """``--column ROLE=NAME`` options as {role: column name}; a role not given is detected."""
    out: dict[str, str | None] = dict.fromkeys(ROLES)
    for c in columns:
        role, eq, name = c.partition("=")
        if not eq or role not in ROLES or not name:
            fail(f"--column takes ROLE=NAME with ROLE one of {', '.join(ROLES)}, not {c!r}")
        out[role] = name
    return out


def score(
    file: Path = typer.Argument(..., help="CSV or Parquet with truth and predicted coordinates"),
    column: List[str] = typer.Option([], "--column", help="ROLE=NAME (repeatable; ROLE one of true_lat, true_lon, "
                                     "pred_lat, pred_lon): give when a column's name is not one geo recognises."),
    suite: Optional[str] = typer.Option(None, help="The suite the file answers, when the file does not say: adds "
                                        "the published results and the scene labels."),
    meta: Optional[Path] = typer.Option(None, help="The suite's metadata CSV for scene labels, when it is not "
                                        "the shared copy."),
    distance: Distance = "haversine",
    ci: Ci = True,
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the rows as a geo predictions Parquet: for "
                                       "`geo sql` and `geo report`."),
    as_json: Json = False,
) -> None:
    """Score any predictions file (ours, GeoEstimation's, OSV-5M's); GeoEstimation result files have their
    footer checked.

    \b
      geo bench score predictions.parquet
      geo bench score results.csv --suite im2gps3k --column pred_lat=LAT_PRED --column pred_lon=LON_PRED
    """
    _check_distance(distance)
    df, footer = read_scored_file(file, _roles(column))
    suite = suite or (df["suite"].dropna().iloc[0] if df["suite"].notna().any() else None)
    if suite and df["scene"].isna().all():
        df["scene"] = _scenes(suite, meta, df["query_id"])
    failed = df["error"].notna()
    ok = df[~failed]
    d = distances_km(ok["true_lat"], ok["true_lon"], ok["pred_lat"], ok["pred_lon"], distance)
    s = summarize(d, n_failed=int(failed.sum()), ci=ci)
    s.update(label_accuracies(ok))
    s.update(file=str(file), distance=distance, suite=suite)
    if ok["scene"].notna().any():
        s["by_scene"] = breakdown(d, ok["scene"].tolist(), ci=False)
    if footer is not None:
        ours = geoestimation_footer(s)
        s["footer"] = {"file": footer, "ours": ours, "reproduced": ours == footer}
    if suite:
        s["published"] = published_json(suite)
        df["suite"] = df["suite"].fillna(suite)
    if out:
        write_predictions(out, df)
        s["out"] = str(out)
    if as_json:
        print_json(s)
        return
    typer.echo(f"{file}: {distance} distances")
    typer.echo(_human(s, suite, "this file"))
    if "footer" in s:
        f = s["footer"]
        typer.echo("\nGeoEstimation footer " + ("reproduced exactly:\n" + f["ours"] if f["reproduced"]
                                              else f"differs:\n  file: {f['file']}\n  ours: {f['ours']}"))


# ---------------------------------------------------------------- geo bench SUITE
def _suite_command(name: str) -> Callable[..., None]:
    suite_obj = SUITES[name]

    def run(
        index: Index,
        images: Optional[Path] = typer.Option(None, "--images", help="Folder with the suite's photos."),
        embeddings: Embeddings = None,
        embedding_column: EmbeddingColumn = "embedding",
        meta: Optional[Path] = typer.Option(None, "--meta", help="The suite's metadata CSV, when it is neither "
                                            "beside --images nor the shared copy."),
        mode: Optional[str] = typer.Option(None, help="fused | knn | gallery | cells | regression, or all: every "
                                           "built mode, each photo embedded once, to compare them (default: the "
                                           "index's best built mode)."),
        crops: int = typer.Option(1, help="Test-time crops per photo (1, 3 or 5): 3 or 5 as some published "
                                  "results do, at 3-5x the time."),
        limit: Optional[int] = typer.Option(None, help="Score only the first N photos: a quick look before a "
                                            "full run."),
        out: Optional[Path] = typer.Option(None, "--out", help="Keep the answers: a predictions Parquet (an "
                                           "interrupted run resumes from it; `geo sql`/`geo report` read it), or "
                                           "a GeoJSON FeatureCollection when the name ends in .geojson."),
        distance: Distance = "haversine",
        exclude_leaks: bool = typer.Option(False, "--exclude-leaks", help="Score only queries new to the gallery. "
                                           "Leaks (same id, same file, a near-duplicate, or the same photographer "
                                           "where both sides name one) are always reported; use this when the "
                                           "gallery and the suite overlap."),
        quiet: Quiet = False,
        ci: Ci = True,
        as_json: Json = False,
    ) -> None:
        if embeddings is not None and name != "custom":
            fail("--embeddings scores precomputed query embeddings with their own lat/lon: use `geo bench custom`")
        if (images is None) == (embeddings is None):
            fail("give --images (a folder of the suite's photos) or, for custom, --embeddings: one of the two")
        if out is not None and (inside := bundle_containing(out)) is not None:
            fail(f"--out {out} is inside the bundle {inside}: write the predictions elsewhere")
        _check_distance(distance)
        idx = open_index(index)
        result = _bench(idx, index, suite_obj, images, embeddings, embedding_column, meta, mode, crops, limit, out,
                        progress=not (quiet or as_json))
        scored = {m: result.summary(distance=distance, ci=ci, exclude_leaks=exclude_leaks, mode=m)
                  for m in result.modes}
        common = dict(crops=crops, out=str(out) if out else None, published=published_json(name))
        regions = region_table(result.predictions)
        if as_json:
            if mode == "all":
                print_json(dict(common, mode="all", modes=scored, region=regions))
            else:
                print_json(dict(next(iter(scored.values()), {}), mode=mode, region=regions, **common))
            return
        typer.echo(f"{suite_obj.title}\nmetadata {result.meta}; {distance} distances; "
                   f"mode {', '.join(result.modes) or mode}")
        if result.resumed:
            typer.echo(f"resumed: {result.resumed} answers (photo and mode) taken from {out}")
        typer.echo(_human(next(iter(scored.values())), name, "this index") if len(scored) == 1
                   else _modes_human(scored, name))
        if regions:
            typer.echo("\n" + format_region_table(regions))
        if result.missing:
            typer.echo(f"\n{len(result.missing)} photos of the metadata are not in {images} "
                       f"(e.g. {', '.join(result.missing[:3])}); they are excluded from n and counted as misses "
                       "in the 'over all photos' line", err=True)
        if out:
            typer.echo(f"\npredictions: {out}")

    run.__doc__ = (f"Benchmark an index on {suite_obj.title}.\n\n    \b\n      geo bench {name} --index my-index "
                   f"--images photos/ --out {name}.parquet\n      geo bench {name} --index my-index --images "
                   "photos/ --mode all --exclude-leaks")
    return run


def _bench(idx: Any, index: Path, suite_obj: Any, images: Path | None, embeddings: Path | None,
           embedding_column: str, meta: Path | None, mode: str | None, crops: int, limit: int | None,
           out: Path | None, progress: bool) -> Any:
    """Answer the suite's photos (or its precomputed embeddings), mark the leaks and keep the answers in ``out``
    (a predictions Parquet, resumed, which gains the leak column; or GeoJSON)."""
    import pandas as pd

    geojson = out is not None and out.suffix.lower() == ".geojson"
    parquet = None if geojson else out
    modes = idx.modes if mode == "all" else [mode]
    if embeddings is not None:
        table = EmbeddingTable(embeddings, embedding_column, dim=int(idx.bundle.manifest["dim"]))
        result = run_embeddings(idx, table, modes=modes, out=parquet, index_id=index_id_of(idx, index))
    else:
        result = run_suite(idx, suite_obj, images, meta=meta, modes=modes, crops=crops, limit=limit, out=parquet,
                           progress=progress, index_id=index_id_of(idx, index))
    mark_leaks(idx, result)
    mark_regions(idx, result.predictions)
    marked = [c for c in ("leak", "region_hit") if result.predictions[c].notna().any()]
    if geojson:
        write_geojson(out, result.predictions)
    elif out is not None and marked:  # the file gains the leak and region columns
        stored = read_predictions(out)
        key = list(zip(result.predictions["query_id"], result.predictions["mode"]))
        for col in marked + (["region_curve"] if "region_hit" in marked else []):
            stored[col] = pd.Series(list(zip(stored["query_id"], stored["mode"]))).map(
                dict(zip(key, result.predictions[col]))).to_numpy()
        write_predictions(out, stored)
    return result


# ---------------------------------------------------------------- geo sql / geo report
def sql(
    query: str = typer.Argument(..., help="SQL over the tables `predictions` and, with --bundle, `errors` and "
                                "`embeddings`"),
    predictions: List[Path] = typer.Option([], "--predictions", "-p",
                                           help="Predictions Parquet file(s) or folders as `predictions` "
                                           "(repeatable; default predictions.parquet unless --bundle is given)."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="A bundle, to ask why photos failed or where "
                                          "the gallery is thin: its errors.parquet as `errors`, its photos' "
                                          "metadata (id, path, lat, lon, extras; no vectors) as `embeddings`."),
    as_json: Json = False,
    as_csv: bool = typer.Option(False, "--csv", help="Rows as CSV: for a spreadsheet."),
) -> None:
    """Run DuckDB SQL over predictions files and a bundle's errors and photo metadata.

    It reads only the files named with -p/--bundle. The query runs with DuckDB's external access off: no
    other file is read or written, no extension is installed or loaded, and the network is not used.

    \b
      geo sql "SELECT scene, median(error_km) FROM predictions GROUP BY 1" -p preds.parquet
      geo sql "SELECT stage, reason, count(*) FROM errors GROUP BY ALL" --bundle my-index
    """
    import pandas as pd

    if not predictions and bundle is None:
        predictions = [Path("predictions.parquet")]
    df = run_sql(query, predictions, bundle)
    if as_json:
        typer.echo(df.to_json(orient="records", date_format="iso", indent=2))
    elif as_csv:
        df.to_csv(sys.stdout, index=False)
    else:
        with pd.option_context("display.max_rows", 200, "display.max_columns", 30, "display.width", 200):
            typer.echo(df.to_string(index=False))


def report(
    predictions: List[Path] = typer.Argument(..., help="Predictions Parquet file(s): `geo bench --out` or "
                                             "`geo query --out`."),
    out: Path = typer.Option(Path("report"), "--out", help="Folder for report.html, the PNGs and report.json: "
                             "give one per run to keep them apart."),
    top: int = typer.Option(10, help="How many best and worst photos to show: more to look for a pattern."),
    ci: Ci = True,
    as_json: Json = False,
) -> None:
    """Threshold table, scene/country/continent breakdowns, best/worst photos, PNGs and an HTML report.

    \b
      geo report preds.parquet --out report/            # then open report/report.html
      geo report shard-*.parquet --json --no-ci         # several files as one run, for scripts
    """
    a, paths = build_report(predictions, out, top_n=top, ci=ci)
    if as_json:
        print_json(dict(a, files={k: str(v) for k, v in paths.items()}))
        return
    typer.echo(report_text(a, top_n=top))
    typer.echo("\nwrote " + ", ".join(str(p) for p in paths.values()))


def register(app: typer.Typer) -> None:
    """Add ``bench`` (``score`` + one command per suite), ``sql`` and ``report`` to ``app``."""
    bench = typer.Typer(help="Benchmark an index on a suite, or score a predictions file.", no_args_is_help=True)
    bench.command("score")(score)
    for name in SUITES:
        bench.command(name)(_suite_command(name))
    app.add_typer(bench, name="bench")
    app.command("sql")(sql)
    app.command("report")(report)
