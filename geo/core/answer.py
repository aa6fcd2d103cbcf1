"""The answer to "where was this photo taken?": one typed record, whatever the mode, the caller or the output.

The query layer (:mod:`geo.query.index`) is the only place that builds one;
the CLI, the benchmarks and any server print or store :meth:`Answer.to_dict`,
so they cannot drift apart. Every field is present in every mode: evidence a
mode does not use is an empty list or dict, never a missing key.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from geo.core.plain import json_safe


PRIOR_ONLY = 0.75  # the prior's share of the mass around an answer above which the photo said little
LOW_EVIDENCE = "little evidence in this photo: the answer is where the gallery's photos concentrate"


@dataclass
class Answer:
    """One photo's (or one embedding's) answer.

    ``confidence`` is the probability the answer holds within
    ``confidence_radius_km``; ``p_within`` gives it for several radii where the
    mode is calibrated. ``abstained`` answers keep their confidence but carry no
    coordinates: the caller asked for at least ``min_confidence``.

    ``evidence`` says what carried the answer: ``basis`` is ``near-duplicate``
    (a gallery photo at least as similar as fusion's duplicate threshold),
    ``prior`` (at least :data:`PRIOR_ONLY` of the mass around the answer is
    the gallery's population prior: the photo itself said little) or ``image``;
    ``signals`` is each signal's share of that mass; ``top_similarity`` is the
    nearest gallery photo's cosine similarity.
    """

    image: str | None
    lat: float | None = None
    lon: float | None = None
    mode: str | None = None
    confidence: float | None = None
    confidence_radius_km: float | None = None
    p_within: dict[str, float] = field(default_factory=dict)
    alternatives: list[dict[str, float]] = field(default_factory=list)
    neighbors: list[dict[str, Any]] = field(default_factory=list)
    top_cells: list[dict[str, Any]] = field(default_factory=list)
    gallery: list[dict[str, float]] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)  # basis, each signal's share, best neighbour similarity
    place: dict[str, Any] = field(default_factory=dict)  # nearest GeoNames place: name, admin1, cc, distance_km
    # the country the answer lies in (Natural Earth shapes): code (ISO 3166-1 numeric), name, and probability,
    # the cell heads' mass on that country where the bundle has them (None without); {} at sea
    country: dict[str, Any] = field(default_factory=dict)
    city: str | None = None  # "name, admin1, cc" of the GeoNames place within 25 km of the answer, else None
    # the city head's most probable cities [{city, prob}] (its classes: the gallery's cities); [] without one
    cities: list[dict[str, Any]] = field(default_factory=list)
    # where the photo is at a stated coverage: the fewest km² of cells whose calibrated posterior mass holds the
    # truth for that share of new photographers' photos (geo.stages.cells.region); {} without cells
    region: dict[str, Any] = field(default_factory=dict)
    # the trip this photo was located with (geo query --trip: its photos' times bound how far apart they can
    # be); None when it was answered alone (evidence["trip"] then says why) or trips were not asked for
    trip: str | None = None
    error: str | None = None
    abstained: bool = False
    # the query-time constraint the answer was kept inside (geo.data.constraint.Constraint.label(): "country:PRT",
    # "box:S,W,N,E", "near:LAT,LON,Rkm", + " weight=W" when soft), None without one
    within: str | None = None
    id: str | None = None  # the row's id when the query was a precomputed embedding (then ``image`` is None)

    @classmethod
    def failed(cls, image: str | None, reason: str, id: str | None = None) -> "Answer":
        """An input that could not be located (unreadable image, bad embedding): the reason, no coordinates."""
        return cls(image=image, error=reason, id=id)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Answer":
        """The inverse of :meth:`to_dict` (an answer that came back from ``geo serve``)."""
        known = {f: d[f] for f in cls.__dataclass_fields__ if f in d}
        return cls(**{"image": None, **known})

    def abstain_below(self, min_confidence: float | None) -> "Answer":
        """Withhold the coordinates when the confidence is below ``min_confidence`` (None: never)."""
        if min_confidence is not None and self.error is None and (self.confidence or 0.0) < min_confidence:
            self.abstained, self.lat, self.lon, self.place, self.country, self.city = True, None, None, {}, {}, None
            self.cities, self.region = [], {}
        return self

    def to_dict(self) -> dict[str, Any]:
        """The JSON fields of ``geo query --json``: ``image`` for a photo, ``id`` for a precomputed embedding.

        Plain JSON data (:func:`~geo.core.plain.json_safe`: NaN as null, tuples as lists), a copy the caller may
        change, made in one walk: ``dataclasses.asdict`` and then ``json_safe`` walked an answer twice, the first
        through ``copy.deepcopy`` of every leaf, 5 ms an answer (most of it the 50 neighbours)."""
        skip = "image" if self.id is not None else "id"
        return json_safe({f.name: getattr(self, f.name) for f in fields(self) if f.name != skip})
