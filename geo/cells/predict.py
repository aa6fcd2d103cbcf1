"""Cell posteriors from the heads: calibrated, backed off to the gallery prior, hierarchical.

Per partition p: log q_p(c|x) = alpha * z_c / T_p + (1 - alpha) * log prior_p(c), renormalised.
T_p (temperature) and alpha are fitted on photographers the heads did not
train on: with few gallery photos per cell an uncalibrated arg-max is
overconfident, and the gallery's cell frequencies (what the constant
"population" guess knows) are a better answer than a guess the head cannot
back up. Fine cells then take the product with their ancestors (Müller-Budack's f*).

The arg-max fine cell answers "which cell"; :meth:`CellPosterior.decide`
answers "which point is most likely within r km" over the cells' photo
spots (:mod:`geo.cells.support`), which with a flat posterior is the
population prior's answer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from geo.bundle import Bundle, BundleError
from geo.cells.support import DECISION_RADII_KM, SupportDecision, check_support
from geo.splits import clustered_se

TEMPERATURES = np.exp(np.linspace(np.log(0.05), np.log(20.0), 31))
CALIBRATION_PHOTOS = 5000  # plenty for two parameters; keeps the grid search seconds on big galleries
ALPHAS = np.linspace(0.0, 1.0, 21)
SUPPORT_FILE = "cells/support.parquet"


# ------------------------------------------------------------ the posterior maths (numpy, batched)
def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def log_priors(counts: list[np.ndarray]) -> list[np.ndarray]:
    """log cell frequency in the gallery, add-one smoothed so an empty (imported) cell is not impossible."""
    return [np.log((c + 1.0) / (c + 1.0).sum()) for c in counts]


def partition_log_probs(logits: list[np.ndarray], priors: list[np.ndarray], temperature: list[float],
                        alpha: float) -> list[np.ndarray]:
    return [log_softmax(alpha * log_softmax(z / t) + (1 - alpha) * lp) for z, lp, t in zip(logits, priors, temperature)]


def fine_log_posterior(logits: list[np.ndarray], priors: list[np.ndarray], temperature: list[float], alpha: float,
                       parents: list[np.ndarray], hierarchy: bool = True) -> np.ndarray:
    """log p(fine cell | image): the heads' f* (or finest-only) evidence, tempered, then the prior once.

    Mixing the gallery prior into every partition before f* would multiply it
    in three times and pile the mass onto the single densest fine cell; mixing
    it once after the hierarchy keeps alpha = 0 equal to the photo prior.
    """
    heads = [log_softmax(z / t) for z, t in zip(logits, temperature)]
    evidence = hierarchical_log_probs(heads, parents) if hierarchy else heads[-1]
    return log_softmax(alpha * evidence + (1 - alpha) * priors[-1])


def hierarchical_log_probs(logp: list[np.ndarray], parents: list[np.ndarray]) -> np.ndarray:
    """f*: log p(fine) + sum over coarser partitions of log p(parent), renormalised.

    ``parents[k]``: for each fine cell, its row in partition k (k < last).
    """
    out = logp[-1].copy()
    for lp, rows in zip(logp[:-1], parents):
        out += lp[:, rows]
    return log_softmax(out)


def fit_calibration(logits: list[np.ndarray], targets: np.ndarray, priors: list[np.ndarray],
                    parents: list[np.ndarray], groups: np.ndarray | None = None) -> dict:
    """Temperatures (per partition) then alpha, by held-out negative log-likelihood.

    ``logits`` must come from heads that did not see these photos; ``groups``
    (photographers) make the one-SE rule's standard error cluster-robust.
    Grid searches: a handful of parameters on a few hundred photos needs no optimiser and never diverges.
    Above CALIBRATION_PHOTOS photos, a seeded subsample is used.
    """
    if len(targets) > CALIBRATION_PHOTOS:
        keep = np.sort(np.random.default_rng(0).choice(len(targets), CALIBRATION_PHOTOS, replace=False))
        logits, targets = [z[keep] for z in logits], targets[keep]
        groups = groups[keep] if groups is not None else None
    temps = []
    for p, z in enumerate(logits):
        ok = targets[:, p] >= 0
        if not ok.any():
            temps.append(1.0)
            continue
        nll = [-log_softmax(z[ok] / t)[np.arange(ok.sum()), targets[ok, p]].mean() for t in TEMPERATURES]
        temps.append(float(TEMPERATURES[int(np.argmin(nll))]))
    ok = targets[:, -1] >= 0
    if not ok.any():
        return {"temperature": temps, "alpha": 1.0, "val_nll_fine": None, "val_photos": 0}
    per_photo = []
    for a in ALPHAS:
        fine = fine_log_posterior([z[ok] for z in logits], priors, temps, a, parents)
        per_photo.append(-fine[np.arange(ok.sum()), targets[ok, -1]])
    best = most_prior_within_one_se(per_photo, groups[ok] if groups is not None else None)
    return {"temperature": temps, "alpha": float(ALPHAS[best]), "val_nll_fine": float(per_photo[best].mean()),
            "val_photos": int(ok.sum())}


def most_prior_within_one_se(per_photo: list[np.ndarray], groups: np.ndarray | None = None) -> int:
    """Index of the smallest alpha (most weight on the gallery prior) whose held-out NLL is within one
    paired standard error (clustered by photographer when ``groups`` is given) of the best.

    A few hundred photos from a few dozen photographers cannot tell apart
    alphas closer than that, and the heads' extra confidence does not
    transfer to new photographers (measured on Im2GPS3k dev folds), so ties go to the prior.
    """
    means = np.array([x.mean() for x in per_photo])
    top = int(np.argmin(means))
    for i, x in enumerate(per_photo):  # ALPHAS ascend: the first that qualifies leans most on the prior
        if means[i] <= means[top] + clustered_se(x - per_photo[top], groups):
            return i
    return top


# ------------------------------------------------------------ query side
@dataclass
class CellPosterior:
    """One image's cell probabilities. ``fine`` is the hierarchical (f*) posterior over the finest partition."""

    partitions: list[str]
    probs: dict[str, np.ndarray]
    fine: np.ndarray
    predictor: "CellPredictor"

    @property
    def best(self) -> int:
        return int(np.argmax(self.fine))

    @property
    def point(self) -> tuple[float, float]:
        """Class2GPS: the photo mean of the most probable fine cell."""
        t = self.predictor.tables[-1]
        return float(t["lat"].iat[self.best]), float(t["lon"].iat[self.best])

    def top_cells(self, k: int = 5) -> list[dict]:
        """The k most probable fine cells (hierarchical probabilities), best first."""
        t = self.predictor.tables[-1]
        order = np.argsort(-self.fine, kind="stable")[:k]
        return [{"partition": self.partitions[-1], "token": t["token"].iat[i], "prob": float(self.fine[i]),
                 "lat": float(t["lat"].iat[i]), "lon": float(t["lon"].iat[i])} for i in order]

    def decide(self, radii_km=DECISION_RADII_KM) -> tuple[float, float, float]:
        """(lat, lon, mass within radii_km[0]): the photo spot with most posterior mass within the radii in turn."""
        lat, lon, mass = self.predictor.decide(self.fine[None, :], radii_km)
        return float(lat[0]), float(lon[0]), float(mass[0])


class CellPredictor:
    """Heads + cell tables of a bundle, ready to turn embeddings into cell posteriors."""

    def __init__(self, tables: list[pd.DataFrame], names: list[str], model, calibration: dict, scene_values: list,
                 support: pd.DataFrame):
        self.tables, self.names, self.model = tables, names, model
        self.calibration = calibration
        self.scene_values = scene_values
        self.support = support
        self.priors = log_priors([t["count"].to_numpy(float) for t in tables])
        self.parents = [_parent_rows(tables[-1], t, n) for t, n in zip(tables[:-1], names[:-1])]
        self._decision = SupportDecision(support, tables[-1]["lat"].to_numpy(float), tables[-1]["lon"].to_numpy(float))

    @classmethod
    def load(cls, bundle: Bundle, device: str = "cpu") -> "CellPredictor":
        from geo.cells.heads import load_heads

        info = bundle.stage("cells")
        try:
            names = list(info["partitions"])
        except KeyError:
            raise BundleError(f"{bundle.root}/manifest.json: cells stage lists no partitions") from None
        tables = [_read_table(bundle.path(f"cells/{n}.parquet"), "cell table") for n in names]
        support_path = bundle.path(SUPPORT_FILE)
        if not support_path.exists():
            raise BundleError(f"{support_path}: missing; the bundle predates support spots, rebuild its cells with "
                              "`geo build-index ... --force cells`")
        support = _read_table(support_path, "support spots")
        try:
            check_support(support, len(tables[-1]), str(support_path))
        except ValueError as e:
            raise BundleError(str(e)) from None
        model, cfg = load_heads(bundle.path("heads/heads.safetensors"), bundle.path("heads/heads.json"), device)
        if [len(t) for t in tables] != model.spec["n_classes"]:
            raise BundleError(f"{bundle.path('heads/heads.json')}: head sizes do not match the cell tables")
        return cls(tables, names, model, cfg["calibration"], cfg.get("scene_values", []), support)

    def scene_codes(self, scene) -> np.ndarray | None:
        """Scene labels (as in the manifest column) -> head indices, -1 unknown."""
        if scene is None or not self.scene_values:
            return None
        lookup = {str(v): i for i, v in enumerate(self.scene_values)}
        return np.array([lookup.get(str(v), -1) for v in np.asarray(scene).ravel()], dtype=np.int64)

    def log_probs(self, emb: np.ndarray, scene=None, hierarchy: bool = True) -> tuple[list[np.ndarray], np.ndarray]:
        """(per-partition log probs, fine log probs) for a batch; ``hierarchy=False`` gives finest-only."""
        from geo.cells.heads import head_logits

        logits, _ = head_logits(self.model, np.asarray(emb, dtype=np.float32), self.scene_codes(scene))
        c = self.calibration
        lp = partition_log_probs(logits, self.priors, c["temperature"], c["alpha"])
        return lp, fine_log_posterior(logits, self.priors, c["temperature"], c["alpha"], self.parents, hierarchy)

    def predict(self, emb: np.ndarray, scene=None) -> list[CellPosterior]:
        lp, fine = self.log_probs(emb, scene)
        probs = [np.exp(x) for x in lp]
        fine = np.exp(fine)
        return [CellPosterior(self.names, {n: p[i] for n, p in zip(self.names, probs)}, fine[i], self)
                for i in range(len(fine))]

    def decide(self, fine_probs: np.ndarray, radii_km=DECISION_RADII_KM) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Batched :meth:`CellPosterior.decide` over fine probabilities [n, C]."""
        return self._decision.decide(fine_probs, radii_km)


def _read_table(path, what: str) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (FileNotFoundError, OSError) as e:
        raise BundleError(f"{path}: cannot read {what} ({e})") from None


def _parent_rows(fine: pd.DataFrame, coarse: pd.DataFrame, coarse_name: str) -> np.ndarray:
    col = f"parent_{coarse_name}"
    if col not in fine.columns:
        raise BundleError(f"fine cell table has no {col} column (cells stage built without hierarchy)")
    pos = pd.Index(coarse["token"]).get_indexer(fine[col])
    if (pos < 0).any():
        raise BundleError(f"fine cell table names parents missing from partition {coarse_name!r}")
    return pos
