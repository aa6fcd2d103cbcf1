"""Cell posteriors from head logits: tempered, backed off to the gallery prior, hierarchical; and their calibration.

Per partition p: log q_p(c|x) = alpha * z_c / T_p + (1 - alpha) * log prior_p(c), renormalised.
T_p (temperature) and alpha are fitted on photographers the heads did not
train on: with few gallery photos per cell an uncalibrated arg-max is
overconfident, and the gallery's cell frequencies (what the constant
"population" guess knows) are a better answer than a guess the head cannot
back up. Fine cells then take the product with their ancestors (Müller-Budack's f*).
"""
from __future__ import annotations

import numpy as np

from geo.core.splits import within_one_se

TEMPERATURES = np.exp(np.linspace(np.log(0.05), np.log(20.0), 31))
CALIBRATION_PHOTOS = 5000  # plenty for two parameters; keeps the grid search seconds on big galleries
ALPHAS = np.linspace(0.0, 1.0, 21)
# Photos whose [photos, cells] float64 posteriors the grid searches hold at once: all 5,000 together were the
# cells stage's peak at 150K x 1280 (+0.47 GB over the heads' training). A photo's likelihood is its own row's.
CALIBRATION_BLOCK = 512


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
    return log_softmax(alpha * fine_evidence(logits, temperature, parents, hierarchy) + (1 - alpha) * priors[-1])


def fine_evidence(logits: list[np.ndarray], temperature: list[float], parents: list[np.ndarray],
                  hierarchy: bool = True) -> np.ndarray:
    """The heads' tempered log evidence over fine cells (f*, or the finest head alone), before the prior."""
    heads = [log_softmax(z / t) for z, t in zip(logits, temperature)]
    return hierarchical_log_probs(heads, parents) if hierarchy else heads[-1]


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
        zs, ts = z[ok], targets[ok, p]
        nll = np.concatenate([[-log_softmax(zs[s] / t)[np.arange(len(ts[s])), ts[s]] for t in TEMPERATURES]
                              for s in _slices(len(ts))], axis=1)  # [temperatures, photos]
        temps.append(float(TEMPERATURES[int(np.argmin(nll.mean(axis=1)))]))
    ok = targets[:, -1] >= 0
    if not ok.any():
        return {"temperature": temps, "alpha": 1.0, "val_nll_fine": None, "val_photos": 0}
    zs, ts = [z[ok] for z in logits], targets[ok, -1]
    per_block = [_alpha_nll(fine_evidence([z[s] for z in zs], temps, parents), ts[s], priors[-1])
                 for s in _slices(len(ts))]
    per_photo = [np.concatenate([b[i] for b in per_block]) for i in range(len(ALPHAS))]
    # ALPHAS ascend, so the first setting within one SE of the best leans most on the gallery prior
    best = within_one_se(per_photo, groups[ok] if groups is not None else None, higher_is_better=False)[0]
    return {"temperature": temps, "alpha": float(ALPHAS[best]), "val_nll_fine": float(per_photo[best].mean()),
            "val_photos": int(ok.sum())}


def _slices(n: int) -> list[slice]:
    return [slice(s, s + CALIBRATION_BLOCK) for s in range(0, n, CALIBRATION_BLOCK)]


def _alpha_nll(evidence: np.ndarray, target: np.ndarray, prior: np.ndarray) -> list[np.ndarray]:
    """Per alpha of :data:`ALPHAS`, each photo's negative log-likelihood of its fine cell (one block of photos)."""
    rows = np.arange(len(target))
    return [-log_softmax(a * evidence + (1 - a) * prior)[rows, target] for a in ALPHAS]
