"""Trips located together (geo.query.trip): a plane's speed bounds each leg, an outlier is pulled back to its
trip, a burst of near-duplicates counts once, photos without a time are answered alone, and `geo query --trip`
carries the trip into the JSON answers and the predictions file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from geo.cli import app
from geo.core.geodesy import haversine_km
from geo.data.taken import column_hours, exif_hours
from geo.query.trip import NO_TIME, ONLY_TIMED, Travel, Trips, locate_trips, trips_from_table
from geo.stages.fusion.posterior import FusionParams, SignalParams
from geo.stages.fusion.signals import Evidence, SignalEvidence, SignalSpec

PARIS, TOKYO, NEW_YORK = (48.8566, 2.3522), (35.6762, 139.6503), (40.7128, -74.006)
SPEC = SignalSpec("cells", "probs")
PARAMS = FusionParams({"cells": SignalParams(1.0)})


def evidence(p_paris: list[float]) -> Evidence:
    """Each photo's posterior over two places: Paris with the given mass, Tokyo with the rest."""
    n = len(p_paris)
    pts = np.tile(np.array([PARIS, TOKYO], np.float64), (n, 1, 1))
    score = np.array([[p, 1.0 - p] for p in p_paris], np.float64)
    return Evidence([SPEC], {"cells": SignalEvidence(pts, score)})


def alone(p_paris: list[float]) -> np.ndarray:
    return np.array([PARIS if p >= 0.5 else TOKYO for p in p_paris], np.float64)


def distinct(n: int, seed: int = 0) -> np.ndarray:
    """Embeddings of n photos that are not near-duplicates of each other."""
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((16, 16)))[0][:n]


def locate(p_paris, hours, emb=None, doubt=0.5, travel=Travel(), ids=None):
    n = len(p_paris)
    trips = Trips(ids or ["t"] * n, np.asarray(hours, np.float64), travel)
    return locate_trips(evidence(p_paris), PARAMS, alone(p_paris), np.full(n, doubt),
                        distinct(n) if emb is None else emb, trips)


def at(answer) -> tuple[float, float]:
    return answer.lat, answer.lon


def test_a_teleporting_outlier_is_pulled_back_to_its_trip():
    """Four photos an hour apart say Paris; the middle one says Tokyo, 9,700 km away: no plane does that in an
    hour, so the trip puts it in Paris. With no bound (and no preference for near places) it stays in Tokyo."""
    p = [0.8, 0.8, 0.3, 0.8, 0.8]
    got = locate(p, [0, 1, 2, 3, 4])
    assert [at(a) for a in got] == [PARIS] * 5
    assert got[2].note["moved_km"] > 9000 and got[0].note["moved_km"] == 0
    assert got[2].note["id"] == "t" and got[2].note["order"] == 2 and got[2].note["photos"] == 5
    unbounded = locate(p, [0, 1, 2, 3, 4], travel=Travel(speed_kmh=1e6, local_weight=0.0))
    assert at(unbounded[2]) == TOKYO


def test_each_photo_states_the_most_confident_calibrated_photo_of_its_trip_not_the_joint_mass():
    """The outlier moved to Paris holds 0.3 of its own mass there, its mates 0.8: it states 0.8 within 25 km,
    what the best single photo supports, not the chain's near-certainty; through a calibration map that halves
    every mass, 0.4. A photo kept at its own answer states what it would alone."""
    p = [0.8, 0.8, 0.3, 0.8, 0.8]
    got = locate(p, [0, 1, 2, 3, 4])
    assert got[2].p_within == {"25": 0.8, "200": 0.8, "750": 0.8} and got[0].p_within["25"] == 0.8
    half = {t: {"x": [0.0, 1.0], "y": [0.0, 0.5]} for t in ("25", "200", "750")}
    params = FusionParams({"cells": SignalParams(1.0)}, calibration=half)
    calibrated = locate_trips(evidence(p), params, alone(p), np.full(5, 0.5), distinct(5),
                              Trips(["t"] * 5, np.arange(5.0), Travel()))
    assert at(calibrated[2]) == PARIS and calibrated[2].p_within["25"] == pytest.approx(0.4)


def test_a_photo_surer_of_its_place_than_its_trip_is_of_another_keeps_it_unless_no_plane_could_get_there():
    """Four photos a day apart lean Paris (0.6, else New York); the last says Tokyo (0.7, else Paris). The chain,
    preferring short legs, puts it in Paris; no photo of the trip is as sure of Paris (0.6) as it is of Tokyo
    (0.7), and a day is time enough to fly, so it stays in Tokyo. An hour after Paris it cannot be in Tokyo,
    and is not."""
    pts = np.tile(np.array([PARIS, TOKYO, NEW_YORK], np.float64), (5, 1, 1))
    score = np.array([[0.6, 0.0, 0.4]] * 4 + [[0.3, 0.7, 0.0]], np.float64)
    ev = Evidence([SPEC], {"cells": SignalEvidence(pts, score)})
    own = np.array([PARIS] * 4 + [TOKYO], np.float64)

    def last(hours):
        trips = Trips(["t"] * 5, np.asarray(hours, float))
        return locate_trips(ev, PARAMS, own, np.full(5, 0.5), distinct(5), trips)[4]

    day = last([0, 24, 48, 72, 96])
    assert at(day) == TOKYO and day.p_within["25"] == pytest.approx(0.7)
    assert (day.alternatives[0]["lat"], day.alternatives[0]["lon"]) == PARIS
    assert at(last([0, 1, 2, 3, 4])) == PARIS


def test_a_photo_in_doubt_can_be_where_its_mates_evidence_agrees_though_their_answers_went_elsewhere():
    """Half an hour apart: the first photo says Paris (0.5) or New York (0.45), the last Tokyo (0.5) or New York
    (0.45); the middle one sees none of them. Paris then Tokyo in an hour is no flight, New York fits all three:
    the middle photo takes New York from its mates' second places (it is none of their answers), and so do they.
    Without mates' places it could only take their answers, which cannot both hold."""
    sydney, cape_town, lima = (-33.87, 151.21), (-33.92, 18.42), (-12.05, -77.04)
    pts = np.array([[PARIS, NEW_YORK, TOKYO], [sydney, cape_town, lima], [TOKYO, NEW_YORK, PARIS]], np.float64)
    ev = Evidence([SPEC], {"cells": SignalEvidence(pts, np.array([[0.5, 0.45, 0.05], [0.4, 0.3, 0.3],
                                                                  [0.5, 0.45, 0.05]]))})
    got = locate_trips(ev, PARAMS, pts[:, 0], np.array([0.5, 0.6, 0.5]), distinct(3),
                       Trips(["t"] * 3, np.array([0.0, 0.5, 1.0])))
    assert [at(a) for a in got] == [NEW_YORK] * 3 and got[1].p_within["25"] == pytest.approx(0.45)


def test_a_photo_with_no_mass_near_its_trip_is_pulled_back_when_its_answer_is_in_doubt():
    """Its own posterior is all Tokyo; only the chance that its evidence misled it lets the trip place it. A
    photo whose answer is certain (doubt 0) keeps it, even against the trip."""
    p = [0.9, 0.9, 0.0, 0.9, 0.9]
    assert at(locate(p, [0, 1, 2, 3, 4], doubt=0.5)[2]) == PARIS
    assert at(locate(p, [0, 1, 2, 3, 4], doubt=0.0)[2]) == TOKYO


def test_every_leg_of_the_joint_answers_is_feasible_and_a_long_gap_lets_the_trip_fly():
    """Paris then Tokyo 24 h later is a flight: both keep their answers. An hour later it is not: the legs of
    the answers never exceed speed * dt + slack, whichever side wins."""
    travel = Travel()
    assert [at(a) for a in locate([0.9, 0.1], [0, 24])] == [PARIS, TOKYO]
    for p in ([0.9, 0.2], [0.7, 0.1], [0.6, 0.4, 0.3]):
        hours = np.arange(len(p), dtype=float)
        got = locate(p, hours)
        for a, b, dt in zip(got, got[1:], np.diff(hours)):
            assert haversine_km(a.lat, a.lon, b.lat, b.lon) <= travel.speed_kmh * dt + travel.slack_km


def test_a_burst_of_near_duplicates_counts_once():
    """Five shots of one scene lean Tokyo (0.6); one clear photo an hour later says Paris (0.8). Counted as five
    independent photos the burst would win (0.6^5 * 0.2 > 0.4^5 * 0.8); counted once, Paris does."""
    p = [0.4] * 5 + [0.8]
    emb = np.vstack([np.tile(distinct(1), (5, 1)), distinct(2)[1:]])
    got = locate(p, [0, 0.01, 0.02, 0.03, 0.04, 1.0], emb=emb, doubt=0.0)
    assert [at(a) for a in got] == [PARIS] * 6


def test_photos_without_a_time_and_lone_timed_photos_are_answered_alone_and_say_why():
    got = locate([0.8, 0.3, 0.8, 0.3], [0, np.nan, 1, 5], ids=["a", "a", "a", "b"])
    assert got[1].lat is None and got[1].note == {"alone": NO_TIME}
    assert got[3].lat is None and got[3].note == {"alone": ONLY_TIMED}
    assert got[0].note["id"] == "a" and got[0].note["photos"] == 2


def test_a_table_names_its_trips_by_a_trip_column_else_the_photographer_and_needs_a_time():
    meta = pd.DataFrame({"id": ["1", "2"], "AUTHOR": ["x", "y"], "taken": ["2024-05-01 10:00", "2024-05-01 12:30"]})
    trips = trips_from_table(meta, Travel())
    assert trips.ids == ["x", "y"] and np.diff(trips.hours)[0] == pytest.approx(2.5)
    assert trips_from_table(meta.assign(trip=["t", "t"]), Travel()).ids == ["t", "t"]
    with pytest.raises(ValueError, match="time column"):
        trips_from_table(meta.drop(columns="taken"), Travel())
    assert column_hours(pd.Series([3600.0, np.nan]))[0] == 1.0 and np.isnan(column_hours(pd.Series(["soon"]))[0])


def save_with_time(textured, path: Path, when: str | None, seed: int) -> str:
    exif = Image.Exif()
    if when is not None:
        exif.get_ifd(0x8769)[0x9003] = when
    textured(320, 240, seed).save(path, exif=exif)
    return str(path)


def test_geo_query_trip_locates_a_folder_as_one_trip_and_writes_the_trip_column(cli_bundle, textured, tmp_path):
    folder = tmp_path / "iceland"
    folder.mkdir()
    times = ["2024:05:01 10:00:00", "2024:05:01 11:00:00", "2024:05:01 13:30:00", None]
    paths = [save_with_time(textured, folder / f"p{i}.jpg", t, i) for i, t in enumerate(times)]
    assert np.diff([exif_hours(p) for p in paths[:3]]).tolist() == [1.0, 2.5] and np.isnan(exif_hours(paths[3]))
    out = tmp_path / "answers.parquet"
    r = CliRunner().invoke(app, ["query", str(folder), "--index", str(cli_bundle[1]), "--trip", "--json",
                                 "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    answers = {Path(a["image"]).name: a for a in map(json.loads, r.output.splitlines())}
    for name in ("p0.jpg", "p1.jpg", "p2.jpg"):
        assert answers[name]["trip"] == str(folder) and answers[name]["evidence"]["trip"]["photos"] == 3
    assert answers["p3.jpg"]["trip"] is None and answers["p3.jpg"]["evidence"]["trip"] == {"alone": NO_TIME}
    assert sorted(pd.read_parquet(out)["trip"].fillna("-")) == ["-"] + [str(folder)] * 3
    geojson = CliRunner().invoke(app, ["query", str(folder), "--index", str(cli_bundle[1]), "--trip", "--format",
                                       "geojson"])
    answers_on_map = [f["properties"] for f in json.loads(geojson.output)["features"]
                      if f["properties"]["role"] == "answer"]
    assert sorted(p["trip"] or "-" for p in answers_on_map) == ["-"] + [str(folder)] * 3
    plain = CliRunner().invoke(app, ["query", str(folder), "--index", str(cli_bundle[1]), "--json"])
    assert all(json.loads(line)["trip"] is None for line in plain.output.splitlines())
    bad = CliRunner().invoke(app, ["query", str(folder), "--index", str(cli_bundle[1]), "--trip", "--mode", "knn"])
    assert bad.exit_code == 2 and "fused" in bad.output


def test_geo_query_trip_reads_trips_and_times_from_an_embeddings_table(cli_bundle, tmp_path):
    """Rows of one `trip` are located together in the order of their `taken` column, whatever the row order;
    a row without a time is answered alone; a table without a time column is refused in one line."""
    shards = sorted((cli_bundle[1] / "embeddings").glob("part-*.parquet"))
    rows = pd.read_parquet(shards[0]).head(4)
    table = pd.DataFrame({"id": [f"q{i}" for i in range(4)], "embedding": list(rows["embedding"]),
                          "trip": ["t", "t", "t", "u"],
                          "taken": ["2024-05-01 12:00", "2024-05-01 10:00", None, "2024-05-02 09:00"]})
    path = tmp_path / "q.parquet"
    table.to_parquet(path)
    r = CliRunner().invoke(app, ["query", "--embeddings", str(path), "--index", str(cli_bundle[1]), "--trip",
                                 "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    got = {a["id"]: a for a in map(json.loads, r.output.splitlines())}
    assert got["q1"]["evidence"]["trip"]["order"] == 0 and got["q0"]["evidence"]["trip"]["order"] == 1
    assert got["q0"]["trip"] == got["q1"]["trip"] == "t"
    assert got["q2"]["evidence"]["trip"] == {"alone": NO_TIME} and got["q3"]["evidence"]["trip"] == {"alone": ONLY_TIMED}
    table.drop(columns="taken").to_parquet(path)
    bad = CliRunner().invoke(app, ["query", "--embeddings", str(path), "--index", str(cli_bundle[1]), "--trip"])
    assert bad.exit_code == 2 and "time column" in bad.output
