"""The city head: which GeoNames city a photo shows, a classifier over the gallery's own cities.

Why a head and not only the city at the answer's point: "which city is this?" is its own question
(Manocchio & Passaro classify cities directly), and a photo can be recognisably Paris while the
coordinates are uncertain by 50 km. Classes are the cities1000 places that at least
:data:`MIN_CITY_PHOTOS` gallery photos lie within 25 km of (the same :func:`geo.data.places.cities_of`
labels as answers and ``geo bench``), plus one class, "elsewhere", for every other photo, so the head can
say a photo is in none of them. It is a linear softmax over the stored embeddings, trained like the cell
heads (:func:`geo.stages.cells.train.train_heads`: early stopping on the held-out photographers, a
compute cap), with one temperature fitted on those photographers' photos; its held-out top-1 accuracy and
the majority-class baseline are recorded, so a user can see whether it beats guessing.

A head that does not beat that baseline by one photographer-clustered standard error
(:func:`geo.core.splits.clustered_se`) is kept in the bundle but not used: answers name no ``cities`` and
its info says why (``used: false``, ``not_used_because``). On a real testbed the head scored 30.9 % held-out
top-1 against 44.6 % for "elsewhere" yet still listed three cities with probabilities, which misleads more
than it helps. A head recorded before this rule (no ``used`` key) keeps answering as it did.

Files: ``heads/cities.safetensors`` (weights) and ``heads/cities.parquet`` (class, city, photos).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from geo.core.splits import clustered_se
from geo.core.tables import Columns, read_columns
from geo.data.places import cities_of
from geo.models.heads import CellHeads, head_logits, load_heads, save_heads
from geo.stages.cells.train import HeadConfig, train_heads
from geo.store.atomic import atomic_write_parquet
from geo.store.bundle import Bundle, BundleError
from geo.store.schema import checked

CITY_WEIGHTS = "heads/cities.safetensors"
CITY_CONFIG = "heads/cities.json"
CITY_TABLE = "heads/cities.parquet"
MIN_CITY_PHOTOS = 5  # a city needs this many gallery photos (and at least tau_min) to be a class
ELSEWHERE = "elsewhere"  # the class of photos in none of the head's cities
TEMPERATURES = np.exp(np.linspace(np.log(0.25), np.log(20.0), 40))
CITIES_SHOWN = 3
CITY_LR = 1e-2  # a single linear layer over unit-norm embeddings: the cell heads' 1e-3 barely moves it in 100 epochs


@dataclass
class CityHead:
    model: CellHeads
    cities: Columns  # class (row order), city ("name, admin1, cc"; ELSEWHERE last), photos: numpy columns
    temperature: float
    info: dict[str, Any]

    def probs(self, emb: np.ndarray) -> np.ndarray:
        """Class probabilities [n, cities + 1] for embeddings [n, dim] or [n, crops, dim] (crops averaged)."""
        e = emb.mean(axis=1) if emb.ndim == 3 else emb
        (logits,), _ = head_logits(self.model, e)
        z = logits.astype(np.float64) / self.temperature
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    @property
    def used(self) -> bool:
        """Whether answers carry this head's cities (a head recorded without the flag predates the check: used)."""
        return bool(self.info.get("used", True))

    def answer_cities(self, emb: np.ndarray) -> list[list[dict[str, Any]]]:
        """Each query's :meth:`top` cities, or [] for every query when the head is not used."""
        if not self.used:
            return [[] for _ in range(len(emb))]
        return [self.top(p) for p in self.probs(emb)]

    def top(self, probs: np.ndarray, k: int = CITIES_SHOWN) -> list[dict[str, Any]]:
        """The k most probable named cities of one row, best first: [{city, prob}]."""
        named = probs[:-1]
        best = np.argsort(-named, kind="stable")[:k]
        names = self.cities["city"].tolist()
        return [{"city": names[j], "prob": round(float(named[j]), 4)} for j in best]

    def save(self, bundle: Bundle) -> list[str]:
        atomic_write_parquet(bundle.path(CITY_TABLE), pa.table(self.cities))
        save_heads(self.model, bundle.path(CITY_WEIGHTS), bundle.path(CITY_CONFIG), {"temperature": self.temperature})
        return [CITY_WEIGHTS, CITY_CONFIG, CITY_TABLE]

    @classmethod
    def load(cls, bundle: Bundle, info: dict[str, Any]) -> "CityHead":
        model, cfg = load_heads(bundle.path(CITY_WEIGHTS), bundle.path(CITY_CONFIG))
        checked(cfg, {"temperature": float}, bundle.path(CITY_CONFIG))
        try:
            cities = read_columns(bundle.path(CITY_TABLE))
        except (OSError, ValueError) as e:
            raise BundleError(f"{bundle.path(CITY_TABLE)}: cannot read the city table ({e})") from None
        if "city" not in cities or model.spec["n_classes"] != [len(cities["city"])] or "temperature" not in cfg:
            raise BundleError(f"{bundle.path(CITY_CONFIG)}: the city head does not match {CITY_TABLE}")
        return cls(model, cities, float(cfg["temperature"]), info)


def fit_city_head(emb: np.ndarray, lat: np.ndarray, lon: np.ndarray, val: np.ndarray, tau_min: int,
                  config: HeadConfig, groups: np.ndarray | None = None) -> CityHead | None:
    """The city head from the training photos (``val``: indices of the held-out photographers' photos, as
    the cell heads use; ``groups``: every photo's photographer, for the standard error that decides whether
    answers use the head), or None when fewer than two cities have enough photos."""
    label = np.array([c or ELSEWHERE for c in cities_of(lat, lon)], dtype=object)
    held = np.zeros(len(emb), bool)
    held[val] = True
    names, counts = np.unique(label[~held], return_counts=True)
    keep = (counts >= max(MIN_CITY_PHOTOS, tau_min)) & (names != ELSEWHERE)
    if keep.sum() < 2:
        return None
    cities = list(names[keep])
    lookup = {c: i for i, c in enumerate(cities)}
    target = np.array([lookup.get(c, len(cities)) for c in label], dtype=np.int64)  # other cities: elsewhere
    n_classes = len(cities) + 1
    dummy = (np.zeros(n_classes), np.zeros(n_classes))  # no label smoothing: class centres are not used
    result = train_heads(emb, target[:, None], [dummy], (lat, lon),
                         HeadConfig(smoothing_km=0.0, lr=CITY_LR, max_epochs=config.max_epochs, seed=config.seed,
                                    device=config.device), val=held)
    info: dict[str, Any] = {"cities": len(cities), "min_photos": int(max(MIN_CITY_PHOTOS, tau_min)),
                            "photos": int(len(emb)), "epochs": len(result.history)}
    temperature = 1.0
    if held.any():
        nll, top1, top1_city = _held_out_pass(result.model, emb, np.flatnonzero(held), target)
        temperature = float(TEMPERATURES[int(np.argmin(nll))])
        info.update(_held_out_scores(top1, top1_city, target, held, [*cities, ELSEWHERE],
                                     groups[held] if groups is not None else None))
    else:
        info.update({"used": False, "not_used_because": "no held-out photographers to check it against"})
    info["temperature"] = round(temperature, 4)
    table = {"class": np.arange(n_classes, dtype=np.int32), "city": np.array([*cities, ELSEWHERE], dtype=object),
             "photos": np.bincount(target[~held], minlength=n_classes).astype(np.int64)}
    return CityHead(result.model.cpu().eval(), table, temperature, info)


HELD_OUT_ROWS = 4096  # held-out rows scored at a time: [rows, classes] logits, never all of them at once


def _held_out_pass(model: CellHeads, emb: np.ndarray, rows: np.ndarray,
                   target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass over the held-out ``rows`` a block at a time: (each :data:`TEMPERATURES` entry's summed negative
    log-likelihood (float64), each photo's top class, its top city). Whole [held, classes] logits and their
    float64 copies were 3 GB of a 150K build's peak (29K held-out photos, 3,164 classes)."""
    nll = np.zeros(len(TEMPERATURES))
    top1, top1_city = np.empty(len(rows), np.int64), np.empty(len(rows), np.int64)
    for r in range(0, len(rows), HELD_OUT_ROWS):
        block = rows[r:r + HELD_OUT_ROWS]
        (z,), _ = head_logits(model, emb[block])
        top1[r:r + len(block)], top1_city[r:r + len(block)] = z.argmax(axis=1), z[:, :-1].argmax(axis=1)
        z64, truth = z.astype(np.float64), target[block]
        for k, t in enumerate(TEMPERATURES):
            s = z64 / t
            s -= s.max(axis=1, keepdims=True)
            nll[k] += float(np.sum(np.log(np.exp(s).sum(axis=1)) - s[np.arange(len(s)), truth]))
    return nll, top1, top1_city


def _held_out_scores(top1: np.ndarray, top1_city: np.ndarray, target: np.ndarray, held: np.ndarray,
                     classes: list[str], groups: np.ndarray | None) -> dict[str, Any]:
    """Held-out top-1 against always answering the training photos' commonest class, and whether the gain
    exceeds one photographer-clustered standard error of the per-photo difference (else: not used)."""
    truth = target[held]
    majority = int(np.bincount(target[~held], minlength=len(classes)).argmax())
    hit = (top1 == truth).astype(np.float64)
    base = (truth == majority).astype(np.float64)
    gain, se = float(hit.mean() - base.mean()), clustered_se(hit - base, groups)
    in_city = truth < len(classes) - 1
    out: dict[str, Any] = {
        "held_out": int(held.sum()),
        "held_out_acc": round(float(hit.mean()), 4),
        "majority_acc": round(float(base.mean()), 4),
        "majority_class": classes[majority],
        "clustered_se": round(se, 4) if np.isfinite(se) else None,
        "held_out_in_a_city": int(in_city.sum()),
        "held_out_city_acc": round(float(np.mean(top1_city[in_city] == truth[in_city])), 4)
        if in_city.any() else None,
        "used": bool(gain > se),
    }
    if not out["used"]:
        out["not_used_because"] = (
            f"held-out top-1 {100 * hit.mean():.1f}% does not beat always answering '{classes[majority]}' "
            f"({100 * base.mean():.1f}%) by a photographer-clustered SE ({100 * se:.1f} points)" if np.isfinite(se)
            else "fewer than two held-out photographers: no clustered SE to check it against")
    return out
