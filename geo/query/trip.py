"""Trips located together: photos taken hours apart cannot be continents apart.

A trip is a photographer's photos in time order (``geo query --trip``). A hidden Markov chain runs along it,
solved by forward-backward:

* a photo's states are the support points of its own fused posterior (the mixture of
  :mod:`geo.stages.fusion.posterior` its answer alone comes from: neighbours, gallery points, cell spots,
  the prior's points), emitting their posterior mass, plus its trip-mates' places (their answers alone and
  the :data:`MATE_PLACES` most probable support points of the :data:`MATE_PHOTOS` nearest in time), emitting
  ``doubt * ANYWHERE`` times the place's weight: with the chance ``doubt`` that its own answer is not even
  within 750 km (1 - its calibrated ``p_within["750"]``), the photo's evidence misled it and it can be where
  its trip was (a hotel room, a misleading scene), also where a mate's evidence points though the mate's
  answer went elsewhere;
* near-duplicates (a burst: photos at least :data:`DUPLICATE_COS` similar) say one thing once: each of
  ``k`` of them emits its posterior to the power ``1/k``, so six shots of a room do not outvote one of the sea;
* the transition between two consecutive photos ``dt`` hours and ``d`` km apart is ``infeasible`` (a
  small number, not zero: a wrong clock must not break the trip) when ``d > speed_kmh * dt + slack_km``,
  the most a plane covers; otherwise ``1 - local_weight + local_weight * exp(-d / (local_km + ground_kmh *
  dt))``: most legs are travelled on the ground, so nearby places are favoured, softly.

The chain proposes, the calibrated confidence disposes. The chain's place for a photo is chosen from its
marginal as fusion chooses from a posterior (the candidate with most marginal mass within the tuned
decision's thresholds); where that is within :data:`REACH_KM` of its answer alone, the trip agrees on the
place and the photo's own answer stands (legs never tell spots that close apart). Its ``p_within`` is NOT
the marginal's mass (the chain multiplies posteriors as if they were independent likelihoods, and its mass
within 25 km stated 0.79 where 0.38 held): it is the most confident single-photo statement the trip makes
about the place, the highest calibrated ``p_within`` (fusion's build-time maps, out of fold) that any photo
of the trip, itself included, gives it from its own posterior (:func:`_confidence`). No trip is needed to
calibrate that, so it holds for galleries without trips (benchmarks/RESULTS.md: stated against observed).
The photo keeps its answer alone where its trip states at least as much there (mean over 25/200/750 km) and
a plane could fly it from and to its neighbours' answers (:func:`_answers`); so a photo sure of its spot is
not moved to a place the evidence backs less, and a kept answer that breaks the speed bound with its
neighbours' gives way to the chain's place.
Photos without a time, and the only timed photo of a trip, are answered alone and say so.
The chain's constants were chosen on trips of 3-4 photos of one testbed; the choice between the photo's
answer and the chain's, :func:`_confidence` and :data:`MATE_PLACES` on that testbed's trips of every size,
and measured on a second (benchmarks/RESULTS.md, "Trips located together").
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from geo.core.geodesy import THRESHOLDS_KM, haversine_km, pairwise_haversine_km, unit_vectors
from geo.core.names import find_column
from geo.core.splits import group_column
from geo.data.taken import TRIP_COLUMNS, column_hours, photo_hours, time_column
from geo.stages.fusion.calibration import CALIBRATED_KM, calibrated
from geo.stages.fusion.posterior import (
    DECISIONS,
    FusionParams,
    SignalParams,
    candidates,
    signal_mass,
    signal_weights,
)
from geo.stages.fusion.signals import Evidence

if TYPE_CHECKING:
    import pandas as pd

ALTERNATIVES = 5
REACH_KM = 25.0   # the trip decides places, the photo the spot within this; also the smoothing of a burst's power
ANYWHERE = 0.3    # a photo's emission at its trip's other answers, per unit of doubt in its own
MATE_PLACES = 10  # each trip-mate's most probable support points a photo may take, beside the mate's answer
MATE_PHOTOS = 10  # ... from this many of its mates, the nearest in time
DUPLICATE_COS = 0.9  # photos of one trip at least this similar are one burst: their evidence counts once
Confidence = Callable[[tuple[float, float]], dict[str, float]]  # a place -> the trip's p_within there
NO_TIME = "no time taken (EXIF DateTimeOriginal or a time column): answered alone"
ONLY_TIMED = "the only photo of its trip with a time: answered alone"
NO_TRIP = "in no trip (its trip column is empty): answered alone"


@dataclass(frozen=True)
class Travel:
    """How far a trip can move between two photos (module docstring): a hard bound and a soft preference."""

    speed_kmh: float = 900.0   # a plane's cruise: no leg is faster
    slack_km: float = 50.0     # a burst taken "at once" still spans a town; clocks and GPS are sloppy
    infeasible: float = 1e-4   # the weight of an impossible leg
    ground_kmh: float = 60.0   # the soft preference's speed: most legs are driven, walked or taken by train
    local_km: float = 25.0     # ... and its reach at dt = 0
    local_weight: float = 0.99  # how much of a leg's weight the soft preference decides

    def __post_init__(self) -> None:
        if not (self.speed_kmh > 0 and self.slack_km >= 0 and 0 < self.infeasible <= 1 and self.ground_kmh >= 0
                and self.local_km > 0 and 0 <= self.local_weight <= 1):
            raise ValueError(f"impossible travel model {self}: speeds and distances positive, weights in 0..1")

    def reach_km(self, dt_h: float | np.ndarray) -> float | np.ndarray:
        """The farthest a leg of ``dt_h`` hours (a number or an array) can go: the hard bound of every leg."""
        return self.speed_kmh * dt_h + self.slack_km

    def transition(self, d_km: np.ndarray, dt_h: float) -> np.ndarray:
        """Leg weights for distances ``d_km`` covered in ``dt_h`` hours."""
        feasible = d_km <= self.reach_km(dt_h)
        near = np.exp(-d_km / (self.local_km + self.ground_kmh * dt_h))
        return np.where(feasible, 1.0 - self.local_weight + self.local_weight * near, self.infeasible)


@dataclass(frozen=True)
class Trips:
    """Which trip each query photo belongs to (None: none) and when it was taken (hours; NaN: unknown)."""

    ids: Sequence[str | None]
    hours: np.ndarray
    travel: Travel = field(default_factory=Travel)

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.hours):
            raise ValueError(f"{len(self.ids)} trip ids but {len(self.hours)} times")


def trips_from_photos(paths: Sequence[str], travel: Travel) -> Trips:
    """Photos given as files: one trip per folder, ordered by each photo's EXIF time."""
    return Trips([os.path.dirname(os.path.abspath(p)) for p in paths], photo_hours(paths), travel)


def trips_from_table(meta: pd.DataFrame, travel: Travel) -> Trips:
    """Rows of an embeddings table: a ``trip`` column, else the photographer's (AUTHOR, owner, ...), else one
    trip; the time from the table's time column (``taken``, ``time``, ...). No time column is an error."""
    import pandas as pd

    when = time_column(meta.columns)
    if when is None:
        raise ValueError("locating trips needs a time column (taken, time, timestamp, datetime, date_taken or "
                         "DateTimeOriginal) in the embeddings table")
    trip = find_column(meta.columns, TRIP_COLUMNS) or group_column(meta.columns)
    ids = ["trip"] * len(meta) if trip is None else [None if pd.isna(v) else str(v) for v in meta[trip]]
    return Trips(ids, column_hours(meta[when]), travel)


@dataclass
class TripAnswer:
    """One photo's answer located with its trip; ``lat`` None where it was answered alone (``note`` says why)."""

    note: dict[str, Any]
    lat: float | None = None
    lon: float | None = None
    p_within: dict[str, float] = field(default_factory=dict)
    alternatives: list[dict[str, float]] = field(default_factory=list)


def locate_trips(ev: Evidence, params: FusionParams, own: np.ndarray, doubt: np.ndarray, emb: np.ndarray,
                 trips: Trips) -> list[TripAnswer]:
    """Each photo's answer with its trip. ``own``: [n, 2] the photos' answers alone, kept where a photo is
    answered alone and reported as ``moved_km`` otherwise; ``doubt``: [n] the chance that each answer alone
    is not even within 750 km (1 - its calibrated p_within); ``emb``: [n, dim] the photos' embeddings,
    which tell near-duplicates apart."""
    if len(trips.ids) != len(ev):
        raise ValueError(f"{len(ev)} photos but {len(trips.ids)} trip entries")
    hours = np.asarray(trips.hours, np.float64)
    posterior = _Posterior(ev, params)
    out = [TripAnswer({"alone": NO_TIME}) if not np.isfinite(h) else None for h in hours]
    for trip, rows in _groups(trips.ids, hours).items():
        if len(rows) < 2:
            out[rows[0]] = TripAnswer({"alone": ONLY_TIMED})
            continue
        solved = _solve(posterior, rows, hours[rows], own[rows], doubt[rows], _evidence_shares(emb[rows]),
                        trips.travel, params.decision)
        answers = _answers(solved, own[rows], hours[rows], trips.travel,
                           lambda at: _confidence(posterior, rows, at, params.calibration))
        for order, (i, answer) in enumerate(zip(rows, answers)):
            answer.note = {"id": trip, "photos": len(rows), "order": order,
                           "moved_km": round(float(haversine_km(own[i, 0], own[i, 1], answer.lat, answer.lon)), 3)}
            out[i] = answer
    return [a if a is not None else TripAnswer({"alone": NO_TRIP}) for a in out]


def _groups(ids: Sequence[str | None], hours: np.ndarray) -> dict[str, np.ndarray]:
    """Trip id -> its timed photos' rows in time order (ties in input order)."""
    import pandas as pd

    frame = pd.DataFrame({"trip": list(ids), "hours": hours, "row": np.arange(len(hours))})
    frame = frame[frame["trip"].notna() & np.isfinite(frame["hours"])].sort_values(["trip", "hours", "row"],
                                                                                   kind="stable")
    return {str(t): g["row"].to_numpy() for t, g in frame.groupby("trip", sort=False)}


class _Posterior:
    """The batch's fused posterior as point masses on each photo's support points (the candidates of its own
    decision): the chain's states, with the posterior mass as their emission."""

    def __init__(self, ev: Evidence, params: FusionParams):
        w = signal_weights(ev, params)
        mass = np.concatenate(
            [signal_mass(s, ev.signals[s.name].score, params.signals.get(s.name, SignalParams(0.0))) * w[:, [b]]
             for b, s in enumerate(ev.specs)], axis=1)                      # [n, m], rows sum to 1
        keep = np.isfinite(ev.points[..., 0]) & (mass > 0)
        self.points = [ev.points[i, keep[i]] for i in range(len(ev))]
        self.mass = [mass[i, keep[i]] for i in range(len(ev))]
        allowed = candidates(ev, params)
        self.candidate = [allowed[i, keep[i]] for i in range(len(ev))]

    def top(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Photo ``i``'s :data:`MATE_PLACES` most probable support points and their mass over the most probable's."""
        best = np.argsort(-self.mass[i], kind="stable")[:MATE_PLACES]
        return self.points[i][best], self.mass[i][best] / self.mass[i][best].max(initial=1e-300)

    def states(self, i: int, others: np.ndarray, weight: np.ndarray, doubt: float,
               share: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Photo ``i``'s states: its support points, then ``others`` [k, 2] (its trip-mates' places, each of
        ``weight`` in 0..1); their emissions, raised to ``share`` (its evidence share), and which of them its
        decision may answer. The support points are a sample of the posterior weighted by their mass, so the
        posterior's power there is each mass times the density around it (smoothed over :data:`REACH_KM`) to
        the ``share - 1``; at a mate's place the photo is only where its evidence misled it:
        ``doubt * ANYWHERE * weight``."""
        pts, mass = self.points[i], self.mass[i]
        density = np.exp(-_km(pts, pts) / REACH_KM) @ mass
        near = doubt * ANYWHERE * weight
        return (np.concatenate([pts, others]), np.concatenate([mass * density ** (share - 1.0), near ** share]),
                np.concatenate([self.candidate[i], np.ones(len(others), bool)]))


def _evidence_shares(emb: np.ndarray) -> np.ndarray:
    """[n] each photo's share of the evidence it repeats: 1 / the number of the trip's photos (itself
    included) at least :data:`DUPLICATE_COS` similar. A burst of near-duplicates says once what one of
    them says; multiplied as if independent, six shots of a hotel room would outvote the one of the sea."""
    unit = unit_vectors(emb)
    return 1.0 / (unit @ unit.T >= DUPLICATE_COS).sum(axis=1).clip(min=1)


def _mates_places(posterior: _Posterior, rows: np.ndarray, hours: np.ndarray, own: np.ndarray,
                  k: int) -> tuple[np.ndarray, np.ndarray]:
    """The places photo ``k`` of a trip may take from its mates: their answers alone (weight 1) and the
    :data:`MATE_PLACES` most probable support points (weight: mass over the mate's most probable) of its
    :data:`MATE_PHOTOS` mates nearest in time, each place once at its highest weight, so a photo can be where a
    mate's evidence points even when the mate's own answer went elsewhere. Only the nearest mates' points, so
    that a long trip's chain does not grow with the square of its length."""
    near = [j for j in np.argsort(np.abs(hours - hours[k]), kind="stable") if j != k][:MATE_PHOTOS]
    tops = [posterior.top(int(rows[j])) for j in near]
    places = np.concatenate([np.delete(own, k, axis=0), *(t[0] for t in tops)])
    weight = np.concatenate([np.ones(len(own) - 1), *(t[1] for t in tops)])
    unique, which = np.unique(places, axis=0, return_inverse=True)
    best = np.zeros(len(unique))
    np.maximum.at(best, which.ravel(), weight)
    return unique, best


def _solve(posterior: _Posterior, rows: np.ndarray, hours: np.ndarray, own: np.ndarray, doubt: np.ndarray,
           shares: np.ndarray, travel: Travel, decision: str) -> list[list[dict[str, float]]]:
    """Forward-backward over one trip's photos (``rows`` in time order, ``own`` their answers alone); each
    photo's emissions raised to its evidence share; each photo's places from its marginal (:func:`_answer`)."""
    built = [posterior.states(int(r), *_mates_places(posterior, rows, hours, own, k), float(doubt[k]), float(shares[k]))
             for k, r in enumerate(rows)]
    states, emit, candidate = (list(x) for x in zip(*built))
    legs = [travel.transition(_km(states[i], states[i + 1]), float(hours[i + 1] - hours[i]))
            for i in range(len(rows) - 1)]
    alpha = [emit[0] / emit[0].sum()]
    for i in range(1, len(rows)):
        a = (alpha[-1] @ legs[i - 1]) * emit[i]
        alpha.append(a / a.sum())
    beta = [np.ones(len(states[-1]))]
    for i in range(len(rows) - 2, -1, -1):
        b = legs[i] @ (emit[i + 1] * beta[0])
        beta.insert(0, b / b.sum())
    u = np.asarray(DECISIONS[decision], np.float64)
    return [_answer(s, a * b / (a * b).sum(), c, u / u.sum(), o)
            for s, a, b, c, o in zip(states, alpha, beta, candidate, own)]


def _km(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[len(a), len(b)] km between (lat, lon) rows."""
    return pairwise_haversine_km(a[:, 0], a[:, 1], b[:, 0], b[:, 1])


def _answer(states: np.ndarray, marginal: np.ndarray, candidate: np.ndarray, u: np.ndarray,
            own: np.ndarray) -> list[dict[str, float]]:
    """Fusion's decision on the photo's marginal: its places best first, each the candidate with most marginal
    mass within the decision's thresholds (``score``) and none within 25 km of one already listed. Where the
    best is within :data:`REACH_KM` of the photo's answer alone, the trip agrees on the place and the photo's own
    answer stands: legs are never told apart that finely, the photo's evidence is."""
    states = np.concatenate([states, own[None]])
    marginal, candidate = np.append(marginal, 0.0), np.append(candidate, True)
    d = _km(states, states)
    within = np.stack([(d <= t) @ marginal for t in THRESHOLDS_KM], axis=1)   # [states, thresholds]
    score = np.where(candidate, within @ u, -np.inf)
    order = np.argsort(-score, kind="stable")
    best = len(states) - 1 if d[order[0], -1] <= REACH_KM else int(order[0])
    places, taken = [], []
    for j in np.concatenate([[best], order[order != best]]):
        if len(places) > ALTERNATIVES or not np.isfinite(score[j]):
            break
        if (d[j, taken] > 25.0).all():
            places.append({"lat": float(states[j, 0]), "lon": float(states[j, 1]), "score": round(float(score[j]), 5)})
            taken.append(int(j))
    return places


def _answers(solved: list[list[dict[str, float]]], own: np.ndarray, hours: np.ndarray, travel: Travel,
             confidence: Confidence) -> list[TripAnswer]:
    """One trip's answers (in time order) from the chain's places: each photo's chosen by :func:`_choose`;
    then a photo that kept its answer alone where a plane could not have flown it from (or to) its neighbours'
    answers takes the chain's place after all (one pass: the chain's own places are feasible legs)."""
    first = [_choose(p, o, True, confidence) for p, o in zip(solved, own)]
    at = np.array([[a.lat, a.lon] for a in first], np.float64)
    kept = (at == own).all(axis=1)
    return [_choose(p, o, False, confidence) if k and not r else a
            for p, o, a, k, r in zip(solved, own, first, kept, _reachable(at, hours, travel))]


def _choose(places: list[dict[str, float]], own: np.ndarray, reachable: bool, confidence: Confidence) -> TripAnswer:
    """The photo's answer: the chain's best place, unless the photo's answer alone is ``reachable`` and its trip
    is at least as confident (mean calibrated ``p_within`` over 25/200/750 km, :func:`_confidence`) in it. The
    chain weighs every photo's posterior as if its mass were a likelihood; a photo sure of its spot must not be
    moved to a trip-mate's place the calibrated evidence backs less (without this, 1 km fell by 1.7 points on the
    tuning trips of >= 5 photos). The other places follow as alternatives."""
    chain = places[0]
    at_chain, at_own = confidence((chain["lat"], chain["lon"])), confidence((float(own[0]), float(own[1])))
    if not reachable or np.mean(list(at_own.values())) < np.mean(list(at_chain.values())):
        return TripAnswer({}, chain["lat"], chain["lon"], at_chain, places[1:ALTERNATIVES + 1])
    far = [p for p in places if haversine_km(own[0], own[1], p["lat"], p["lon"]) > 25.0]
    return TripAnswer({}, float(own[0]), float(own[1]), at_own, far[:ALTERNATIVES])


def _reachable(at: np.ndarray, hours: np.ndarray, travel: Travel) -> np.ndarray:
    """[n] True where both legs of a photo's answer (``at``, in time order) are flights a plane could make: from
    the answer before it and to the one after it (:meth:`Travel.reach_km`)."""
    leg = haversine_km(at[:-1, 0], at[:-1, 1], at[1:, 0], at[1:, 1]) <= travel.reach_km(np.diff(hours))
    return np.concatenate([[True], leg]) & np.concatenate([leg, [True]])


def _confidence(posterior: _Posterior, rows: np.ndarray, at: tuple[float, float],
                calibration: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    """The answer's ``p_within``: for each radius, the highest calibrated confidence any of the trip's photos
    (``rows``) has, from its own posterior mass within that radius of ``at`` (module docstring). The marginal's
    own mass is not used: on held-out trips it was overconfident by 0.2-0.4 at every radius."""
    best = dict.fromkeys(CALIBRATED_KM, 0.0)
    for r in rows:
        d = haversine_km(at[0], at[1], posterior.points[r][:, 0], posterior.points[r][:, 1])
        mass = {t: float(posterior.mass[r][d <= int(t)].sum()) for t in CALIBRATED_KM}
        best = {t: max(best[t], p) for t, p in calibrated(mass, calibration).items()}
    return best
