"""Where a photo is already known to be: a query-time constraint (countries, a box, or a circle) and its test.

A person locating a photo often knows more than the photo shows ("somewhere in Portugal", "in this map view",
"within 50 km of Lyon"). :class:`Constraint` is that knowledge, parsed once from the words a person types, with
one membership test over arrays of coordinates that the query side applies to every candidate point
(:mod:`geo.stages.within`). Countries are the Natural Earth shapes of :mod:`geo.data.countries`, so "inside
Portugal" means what ``Answer.country`` means; a country is named by its ISO 3166-1 alpha-2 or alpha-3 code or
its name (ISO's, its common or official name, or Natural Earth's), in any case. The code table
(``iso3166.csv``: numeric, alpha-2, alpha-3, names) is read from Debian's ``iso-codes`` (LGPL-2.1; the codes
are ISO's), vendored so that nothing is looked up at run time.

One grammar, :meth:`Constraint.parse` (``geo query --within``, ``geo serve``'s ``within`` parameter): countries
(``PT,ES``), ``box:S,W,N,E`` or ``near:LAT,LON,KM``, then `` weight=W`` for a soft one. ``weight`` 0 is a hard
constraint (nothing outside survives); a weight in (0, 1) is a soft prior: the posterior mass outside is
multiplied by it. :meth:`Constraint.label` is the short text answers and predictions carry in their ``within``
field, and it parses back to the same constraint.

A point is in a country when :func:`geo.data.countries.country_index` says so: the one country lookup, whose
coast rule (a point in no shape but within 25 km of one takes the nearest's country) keeps a city's
waterfront, often water at 1:50m, inside its country.
"""
from __future__ import annotations

import csv
import difflib
import functools
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from geo.core.geodesy import EARTH_RADIUS_KM, haversine_km
from geo.data.countries import country_codes, country_index, country_names

ISO_TABLE = Path(__file__).with_name("iso3166.csv")


class ConstraintError(ValueError):
    """A constraint that cannot be used; the message names the value and what is wrong with it."""


@dataclass(frozen=True)
class _Country:
    shapes: tuple[int, ...]  # indices into country_names(): Australia is two shapes under one ISO code
    label: str  # alpha-3 code, or the Natural Earth name of a shape without one (Kosovo, N. Cyprus, ...)


def _key(text: str) -> str:
    return " ".join(text.casefold().split())


@functools.cache
def _countries_by_key() -> tuple[dict[str, _Country], dict[str, str]]:
    """(every accepted spelling, case-folded -> the country's shape and label; case-folded name -> the name as
    written, for the did-you-mean of a misspelling)."""
    shapes_of: dict[str, tuple[int, ...]] = {}
    for i, code in enumerate(country_codes()):
        if code is not None:
            shapes_of[code] = (*shapes_of.get(code, ()), i)
    out: dict[str, _Country] = {}
    written: dict[str, str] = {}
    with ISO_TABLE.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["numeric"] not in shapes_of:
                continue  # no shape at Natural Earth's 1:50m (a few small islands): membership cannot be tested
            c = _Country(shapes_of[row["numeric"]], row["alpha3"])
            for spelling in (row["alpha2"], row["alpha3"], row["name"], *filter(None, row["other_names"].split("|"))):
                out.setdefault(_key(spelling), c)
                written.setdefault(_key(spelling), spelling)
    label = {s: c.label for c in out.values() for s in c.shapes}
    for i, name in enumerate(country_names()):  # Natural Earth's own names ("Dem. Rep. Congo", "Kosovo")
        out.setdefault(_key(name), _Country((i,), label.get(i, name)))
        written.setdefault(_key(name), name)
    return out, written


def _country(word: str) -> _Country:
    known, written = _countries_by_key()
    found = known.get(_key(word))
    if found is None:
        names = sorted(k for k in written if len(k) > 3)  # names: a misspelt code is not near anything useful
        near = difflib.get_close_matches(_key(word), names, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(repr(written[n]) for n in near)}?)" if near else ""
        raise ConstraintError(f"--within: unknown country {word!r}{hint}; give an ISO 3166-1 alpha-2 or alpha-3 code "
                              "(PT, PRT) or a name (Portugal)")
    return found


def _numbers(text: str, count: int, what: str, option: str) -> list[float]:
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise ConstraintError(f"{option}: expected {what} ({count} numbers separated by commas), not {text!r}")
    return values


def _check_lat(v: float, option: str) -> None:
    if not -90 <= v <= 90:
        raise ConstraintError(f"{option}: latitude {v:g} is outside -90..90")


def _check_lon(v: float, option: str) -> None:
    if not -180 <= v <= 180:
        raise ConstraintError(f"{option}: longitude {v:g} is outside -180..180")


@dataclass(frozen=True)
class Constraint:
    """Countries (``shapes``: indices into :func:`country_names`), a box (``box``: south, west, north, east; a
    west greater than east crosses the antimeridian) or a circle (``near``: lat, lon, radius in km)."""

    kind: str  # "country" | "box" | "near"
    shapes: tuple[int, ...] = ()
    names: tuple[str, ...] = ()  # the countries' labels, in the order given
    box: tuple[float, float, float, float] | None = None
    near: tuple[float, float, float] | None = None
    weight: float = 0.0  # 0: hard; in (0, 1): the posterior mass outside is multiplied by it

    @classmethod
    def countries(cls, text: str) -> "Constraint":
        """One or several countries, comma-separated: ``"PT"``, ``"prt, Spain"``."""
        words = [w.strip() for w in str(text).split(",") if w.strip()]
        if not words:
            raise ConstraintError("--within: no country given")
        found = list(dict.fromkeys(_country(w) for w in words))
        return cls("country", tuple(sorted({s for c in found for s in c.shapes})), tuple(c.label for c in found))

    @classmethod
    def bounding_box(cls, text: str) -> "Constraint":
        """``"S,W,N,E"`` in degrees (south, west, north, east)."""
        s, w, n, e = _numbers(text, 4, "SOUTH,WEST,NORTH,EAST in degrees", "--within box")
        for lat in (s, n):
            _check_lat(lat, "--within box")
        for lon in (w, e):
            _check_lon(lon, "--within box")
        if s >= n:
            raise ConstraintError(f"--within box: south {s:g} must be below north {n:g} (the order is S,W,N,E)")
        if w == e:
            raise ConstraintError(f"--within box: west and east are both {w:g}: the box has no width")
        return cls("box", box=(s, w, n, e))

    @classmethod
    def circle(cls, text: str) -> "Constraint":
        """``"LAT,LON,KM"``: within KM (a trailing "km" allowed) of a point."""
        text = str(text).strip()
        lat, lon, radius_km = _numbers(text[:-2] if text.lower().endswith("km") else text, 3,
                                       "LAT,LON,RADIUS_KM", "--within near")
        _check_lat(lat, "--within near")
        _check_lon(lon, "--within near")
        if not 0 < radius_km <= math.pi * EARTH_RADIUS_KM:
            raise ConstraintError(f"--within near: the radius must be a distance in km above 0 and at most half the "
                                  f"Earth's circumference, not {radius_km:g}")
        return cls("near", near=(lat, lon, radius_km))

    @classmethod
    def parse(cls, text: str) -> "Constraint":
        """What ``--within`` takes: countries (``"PT,ES"``, ``"country:PRT"``), ``"box:S,W,N,E"`` or
        ``"near:LAT,LON,KM"``, with ``" weight=W"`` after it for a soft one: every :meth:`label` reads back."""
        text, _, weight = str(text).partition(" weight=")
        kind, colon, rest = text.strip().partition(":")
        make = {"box": cls.bounding_box, "near": cls.circle, "country": cls.countries}.get(kind.strip().lower())
        found = make(rest) if colon and make is not None else cls.countries(text)
        return found.weighted(_numbers(weight, 1, "a weight", "--within ... weight=")[0] if weight else None)

    def weighted(self, weight: float | None) -> "Constraint":
        """The same constraint, soft when ``weight`` is in (0, 1) (None: hard)."""
        if weight is None:
            return replace(self, weight=0.0)
        if not (0 < weight < 1):  # NaN fails too
            raise ConstraintError(f"--within-weight must be above 0 and below 1 (the factor on the mass outside; "
                                  f"leave it out for a hard constraint), not {weight:g}")
        return replace(self, weight=float(weight))

    @property
    def hard(self) -> bool:
        return self.weight == 0.0

    def contains(self, lat, lon) -> np.ndarray:
        """[n] True for the points inside (a missing coordinate is never inside)."""
        lat = np.atleast_1d(np.asarray(lat, np.float64))
        lon = np.atleast_1d(np.asarray(lon, np.float64))
        if self.kind == "country":  # a missing coordinate is in no country (-1)
            return np.isin(country_index(lat, lon), self.shapes)
        ok = np.isfinite(lat) & np.isfinite(lon)
        if self.kind == "box":
            s, w, n, e = self.box
            across = (lon >= w) | (lon <= e) if w > e else (lon >= w) & (lon <= e)
            return ok & (lat >= s) & (lat <= n) & across
        c_lat, c_lon, r = self.near
        with np.errstate(invalid="ignore"):
            return ok & (np.nan_to_num(haversine_km(lat, lon, c_lat, c_lon), nan=np.inf) <= r)

    def label(self) -> str:
        """The short text of answers' and predictions' ``within``: ``country:PRT,ESP``, ``box:S,W,N,E`` or
        ``near:LAT,LON,Rkm``, then `` weight=W`` when soft."""
        if self.kind == "country":
            text = "country:" + ",".join(self.names)
        elif self.kind == "box":
            text = "box:" + ",".join(f"{v:.10g}" for v in self.box)
        else:
            text = "near:{:.10g},{:.10g},{:.10g}km".format(*self.near)  # 10 digits: what was typed reads back
        return text if self.hard else f"{text} weight={self.weight:g}"

    def __str__(self) -> str:
        return self.label()


def constraint_from_options(within: str | None = None, within_weight: float | None = None) -> Constraint | None:
    """The constraint of ``geo query --within TEXT [--within-weight W]`` (and of ``geo serve``'s query parameters of
    the same names): None when none is given, a :class:`ConstraintError` naming what is wrong."""
    if not within:
        if within_weight is not None:
            raise ConstraintError("--within-weight needs a constraint: --within COUNTRIES | box:S,W,N,E | "
                                  "near:LAT,LON,KM")
        return None
    found = Constraint.parse(within)
    return found if within_weight is None else found.weighted(within_weight)
