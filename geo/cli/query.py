"""``geo query``: locate photos against a bundle or a running server; human lines, JSON lines, GeoJSON, Parquet."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from geo.cli.common import fail, print_json
from geo.cli.options import Device, EmbeddingColumn, Embeddings, Index, Json
from geo.core.answer import LOW_EVIDENCE, Answer
from geo.core.files import one_line
from geo.core.progress import showing
from geo.data.constraint import Constraint, ConstraintError, constraint_from_options
from geo.data.embedding_table import EmbeddingTable
from geo.data.images import SMALL_SIDE, expand_images, small_image
from geo.query.client import locate_remote
from geo.query.index import open_index
from geo.stages.cells.region import DEFAULT_COVERAGE
from geo.query.trip import Travel
from geo.store.bundle import bundle_containing
from geo.store.geojson import feature_collection, write_geojson
from geo.store.predictions import answers_to_frame, write_predictions


PARTIAL_EXIT = 3  # some inputs failed and the others were answered (README, "Using it")


def print_human(ans: Answer, top: int = 3) -> None:
    name = one_line(ans.image if ans.id is None else ans.id)
    if ans.error:
        typer.echo(f"{name}: could not read ({ans.error})")
        return
    if ans.abstained:
        typer.echo(f"{name}: abstained (confidence {ans.confidence:.2f} below --min-confidence)")
        return
    near = (f"  near {ans.place['name']}, {ans.place['admin1'] + ', ' if ans.place['admin1'] else ''}"
            f"{ans.place['cc']}" if ans.place else "")
    typer.echo(f"{name}: {ans.lat:.5f}, {ans.lon:.5f}{near}  [{ans.mode}]  "
               f"confidence {ans.confidence:.2f} within {ans.confidence_radius_km or 0:g} km"
               + (f"  (kept inside {ans.within})" if ans.within else ""))
    basis = ans.evidence.get("basis")
    if basis == "prior":
        typer.echo(f"    {LOW_EVIDENCE}")
    elif basis == "near-duplicate" and ans.neighbors:
        typer.echo(f"    a near-duplicate of gallery photo {one_line(ans.neighbors[0]['id'])} "
                   f"(similarity {ans.neighbors[0]['similarity']:.3f}): answered at its spot")
    if ans.region:
        r = ans.region
        typer.echo(f"    region holding the truth for {r['coverage']:.0%} of new photos"
                   f"{'' if r['calibrated'] else ' (uncalibrated: posterior mass)'}: {r['area_km2']:,.0f} km² in "
                   f"{len(r['cells'])} cells")
    how = ans.evidence.get("trip") or {}
    if ans.trip is not None:
        typer.echo(f"    with its trip {one_line(ans.trip)}: photo {how['order'] + 1} of {how['photos']}"
                   + (f", {how['moved_km']:.0f} km from its answer alone" if how["moved_km"] else ""))
    elif "alone" in how:
        typer.echo(f"    {how['alone']}")
    for alt in ans.alternatives[:3]:
        own = alt.get("mass", {}).get("25")
        typer.echo(f"    alternative {alt['lat']:.4f}, {alt['lon']:.4f}  score {alt['score']:.3f}"
                   + (f" (mass within 25 km {own:.3f})" if own is not None else ""))
    for n in ans.neighbors[:top]:
        typer.echo(f"    neighbour {one_line(n['id'])}  sim {n['similarity']:.3f}  at {n['lat']:.4f}, {n['lon']:.4f}"
                   f"  ({n['distance_km']:.1f} km from answer)")


# The query-time constraint (geo.data.constraint): answers only inside, or (--within-weight) leaning inside.
Within = Annotated[Optional[str], typer.Option(
    "--within", help="Answer only inside what you already know: countries (ISO 3166-1 alpha-2 or alpha-3 codes or "
    "names, any case, comma-separated: --within PT,ES), a box (--within box:SOUTH,WEST,NORTH,EAST in degrees; "
    "west > east crosses the antimeridian) or a circle (--within near:LAT,LON,RADIUS_KM).")]
WithinWeight = Annotated[Optional[float], typer.Option(
    "--within-weight", help="Make --within soft (fused mode): the mass outside is multiplied by this weight "
    "(0 < W < 1) instead of removed, for a place you are fairly, not fully, sure of.")]


def _check_values(output: str, crops: int, min_confidence: float | None, coverage: float) -> None:
    """The options that take a value from a fixed set or range; NaN fails every comparison."""
    if output not in ("text", "json", "geojson"):
        fail(f"--format must be text, json or geojson, not {output!r}")
    if crops not in (1, 3, 5):
        fail("--crops must be 1, 3 or 5")
    if min_confidence is not None and not 0 <= min_confidence <= 1:
        fail(f"--min-confidence must be a number from 0 to 1, not {min_confidence}")
    if not 0 < coverage <= 1:
        fail(f"--coverage must be a number above 0 and at most 1, not {coverage}")


def query_command(
    images: Optional[list[str]] = typer.Argument(None, help="Image files, globs or directories."),
    index: Index = None,
    embeddings: Embeddings = None,
    embedding_column: EmbeddingColumn = "embedding",
    mode: Optional[str] = typer.Option(None, help="fused (the default when built) | knn | gallery | cells | "
                                       "regression: one signal alone, to compare them or to see why fused chose."),
    crops: int = typer.Option(1, help="Test-time crops: 1, 3 (along the long side) or 5 (five-crop). 3 or 5 for "
                              "panoramas and tall photos, at 3-5x the time."),
    device: Device = "auto",
    output: str = typer.Option("text", "--format", help="text (lines for people) | json (one object per image, "
                               "as --json) | geojson (one FeatureCollection: answers, alternatives, regions, "
                               "truth) to drop on a map."),
    as_json: Json = False,
    out: Optional[Path] = typer.Option(None, help="Also write the answers to a file, for many photos: a "
                                       "predictions Parquet (`geo sql` and `geo report` read it), or GeoJSON when "
                                       "the name ends in .geojson."),
    min_confidence: Optional[float] = typer.Option(None, help="Abstain (no coordinates, abstained=true) below "
                                                   "this confidence: when a wrong answer costs more than none."),
    server: Optional[str] = typer.Option(None, "--server", help="Ask a running `geo serve` at this URL instead of "
                                         "loading --index here: no model load, fast for a few photos."),
    coverage: float = typer.Option(DEFAULT_COVERAGE, help="The answer's region holds the truth for this share "
                                   "of new photographers' photos (conformally calibrated at build time): 0.5 for "
                                   "a small area, 0.95 for a safe one."),
    token: Optional[str] = typer.Option(None, envvar="GEO_TOKEN", help="The server's token, with --server (or "
                                        "GEO_TOKEN, which keeps it out of the process list)."),
    within: Within = None,
    within_weight: WithinWeight = None,
    trip: bool = typer.Option(False, "--trip", help="Locate each trip's photos together, in the order they were "
                              "taken: photos hours apart cannot be continents apart. Photos: one trip per folder, "
                              "times from EXIF; --embeddings: a trip column (else the photographer's) and a time "
                              "column (taken, time, ...). Photos without a time are answered alone."),
    speed_kmh: float = typer.Option(Travel.speed_kmh, "--speed-kmh", help="With --trip: the fastest travel "
                                    "between two photos (default a plane's)."),
) -> None:
    """Locate photos (or precomputed embeddings): coordinates, confidence and the neighbour photos behind the answer.

    \b
      geo query holiday.jpg --index my-index
      geo query photos/ --index my-index --json --mode knn
      geo query photos/ --index my-index --format geojson --coverage 0.8 > answers.geojson
      geo query --embeddings queries.parquet --index my-index --out predictions.parquet
      geo query holiday.jpg --server http://127.0.0.1:8000
      geo query holiday.jpg --index my-index --within PT
      geo query holiday.jpg --index my-index --within near:45.76,4.84,50
      geo query trips/iceland/ --index my-index --trip

    Exit code 0: every input answered; 3: some not (named on stderr, the rest answered); 1: none; 2: bad option.
    """
    output = "json" if as_json else output
    _check_values(output, crops, min_confidence, coverage)
    if bool(images) == (embeddings is not None):
        fail("give image paths or --embeddings PATH: one of the two")
    if (index is None) == (server is None):
        fail("give --index DIR (answer here) or --server URL (ask a running `geo serve`): one of the two")
    if server is not None and embeddings is not None:
        fail("--server takes image paths; send precomputed embeddings to the server's /locate as JSON")
    travel = _travel(trip, speed_kmh, server)
    if out is not None and (inside := bundle_containing(out)) is not None:
        fail(f"--out {out} is inside the bundle {inside}: write the answers elsewhere")
    try:
        constraint = constraint_from_options(within, within_weight)
    except ConstraintError as e:
        fail(str(e))
    truth, answer_mode = None, mode
    if server is not None:
        answers = locate_remote(server, expand_images(list(images)), token=token, mode=mode,
                                min_confidence=min_confidence, crops=crops, within=constraint,
                                coverage=coverage)
    else:
        answers, truth, answer_mode = _locate_here(index, device, images, embeddings, embedding_column, mode, crops,
                                                   min_confidence, travel, constraint, coverage)
    _emit(answers, truth, embeddings is not None, output, out, answer_mode, str(server or index))


def _emit(answers: list[Answer], truth, by_id: bool, output: str, out: Path | None, mode: str | None,
          index_id: str) -> None:
    """Print the answers (text, JSON lines or GeoJSON) and write --out; exit 1 when none could be answered."""
    frame = None
    if out is not None or output == "geojson":
        ids = [a.id for a in answers] if by_id else None
        frame = answers_to_frame(answers, ids, None if truth is None else [tuple(t) for t in truth],
                                 mode=mode, suite="query", index_id=index_id)
    if out is not None:
        (write_geojson if out.suffix.lower() == ".geojson" else write_predictions)(out, frame)
    if output == "geojson":
        print_json(feature_collection(frame), indent=None)
    for ans in answers if output != "geojson" else ():
        if output == "json":
            print_json(ans.to_dict(), indent=None)
        else:
            print_human(ans)
    sys.stdout.flush()
    _warn_and_exit(answers)


def _warn_small(answers: list[Answer]) -> None:
    """A warning on stderr for each answered photo too small to locate by (under 64 px on its short side)."""
    for a in answers:
        size = None if a.error or a.id is not None else small_image(a.image)
        if size:
            typer.secho(f"warning: {one_line(a.image)} is {size[0]}x{size[1]} pixels, under {SMALL_SIDE} on its "
                        "short side: too little to locate it by; its answer leans on the gallery's prior",
                        fg=typer.colors.YELLOW, err=True)


def _warn_and_exit(answers: list[Answer]) -> None:
    """The small photos' warnings, then exit code 3 when some inputs could not be answered (the others were), 1
    when none could, naming them: a script must not take a partial run for a whole one."""
    _warn_small(answers)
    failed = [a for a in answers if a.error]
    if not failed:
        return
    named = "; ".join(f"{one_line(a.image if a.id is None else a.id)} ({a.error})" for a in failed[:3])
    more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
    typer.secho(f"error: {len(failed)} of {len(answers)} inputs could not be answered: {named}{more}",
                fg=typer.colors.RED, err=True)
    raise typer.Exit(1 if len(failed) == len(answers) else PARTIAL_EXIT)


def _travel(trip: bool, speed_kmh: float, server: Optional[str]) -> Optional[Travel]:
    """The travel model of --trip (None without it); --trip is answered here, where the posteriors are."""
    if trip and server is not None:
        fail("--trip locates a trip's photos together here: give --index DIR, not --server")
    if not speed_kmh > 0:
        fail(f"--speed-kmh must be a positive number, not {speed_kmh}")
    return Travel(speed_kmh=speed_kmh) if trip else None


def _locate_here(index: Path, device: str, images: Optional[list[str]], embeddings: Optional[Path],
                 embedding_column: str, mode: Optional[str], crops: int, min_confidence: Optional[float],
                 travel: Optional[Travel], constraint: Optional[Constraint],
                 coverage: float) -> tuple[list[Answer], Any, str]:
    """(answers, truth of an embeddings table or None, the mode that answered) from the bundle at ``index``."""
    idx = open_index(index, device=device)
    if embeddings is not None:
        table = EmbeddingTable(embeddings, embedding_column, dim=int(idx.bundle.manifest["dim"]),
                               require_coordinates=False)
        answers, truth = idx.locate_table(table, mode=mode, min_confidence=min_confidence, within=constraint,
                                          coverage=coverage, trip=travel)
        return answers, truth, mode or idx.default_mode
    with showing(bars=sys.stderr.isatty()):  # a bar for many photos, in a terminal only
        answers = idx.locate(list(images), mode=mode, crops=crops, min_confidence=min_confidence, within=constraint,
                             coverage=coverage, trip=travel)
    return answers, None, mode or idx.default_mode


def register(app: typer.Typer) -> None:
    app.command("query")(query_command)
