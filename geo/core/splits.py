"""The one validation split every trained stage (heads, gallery, fusion) holds out, its standard errors and the one-SE rule.

All stages must hold out the same photos: fusion weights are tuned on
photos that neither the heads nor the location encoder have seen, which is
only true if they share this split. Whole groups (photographers) go to one
side, so validation measures geolocation rather than memory of one trip.
"""
from __future__ import annotations

import numpy as np

from geo.core.names import find_column

# The columns that name a photo's photographer, matched case-insensitively (the other column aliases are in
# geo.data.columns): whole groups are held out together.
GROUP_COLUMNS = ("author", "owner", "user", "photographer")


def group_column(columns, requested: str | None = None) -> str | None:
    """The requested group column (must exist), else the first known one present, else None."""
    columns = list(columns)
    if requested:
        if requested not in columns:
            raise ValueError(f"group column {requested!r} is not a manifest column ({', '.join(map(str, columns))})")
        return requested
    return find_column(columns, GROUP_COLUMNS)


def validation_mask(n: int, groups=None, val_fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """Boolean [n], True for held-out rows: whole groups in seeded order until ``val_fraction`` of the rows.

    A group that would more than double the target is skipped (one prolific
    photographer must not swallow the validation set); without groups, or
    with a single group, rows are drawn at random.
    """
    rng = np.random.default_rng(seed)
    target = max(1, int(round(val_fraction * n))) if val_fraction > 0 else 0
    mask = np.zeros(n, bool)
    if target == 0 or n < 2:
        return mask
    if groups is None or len(np.unique(np.asarray(groups).astype(str))) < 2:
        mask[rng.permutation(n)[:target]] = True
        return mask
    uniq, inv = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    sizes = np.bincount(inv)
    chosen, total = [], 0
    for g in rng.permutation(len(uniq)):
        if total >= target:
            break
        if total + sizes[g] > 2 * target and chosen:
            continue
        chosen.append(g)
        total += sizes[g]
    if len(chosen) == len(uniq):  # never hold out every group
        chosen = chosen[:-1]
    return np.isin(inv, chosen)


def training_rows(n: int, cap: int, seed: int = 0) -> np.ndarray | None:
    """The rows whose embeddings the trained stages hold: None (every row) up to ``cap``, else a seeded uniform
    sample of ``cap`` rows, sorted (so it is read in one pass over the shards)."""
    if n <= cap:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))


def group_folds(n: int, groups=None, k: int = 3, seed: int = 0) -> np.ndarray:
    """Fold number [n] in 0..k-1; whole groups dealt largest first to the lightest fold, so folds have
    similar photo counts. Without groups, rows are dealt at random."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.permutation(n) % k
    uniq, inv, counts = np.unique(np.asarray(groups).astype(str), return_inverse=True, return_counts=True)
    order = rng.permutation(len(uniq))
    load, fold_of = np.zeros(k), np.zeros(len(uniq), int)
    for g in sorted(order, key=lambda g: -counts[g]):
        f = int(np.argmin(load))
        fold_of[g], load[f] = f, load[f] + counts[g]
    return fold_of[inv]


def clustered_se(d: np.ndarray, groups: np.ndarray | None = None) -> float:
    """Standard error of mean(d); with groups, cluster-robust (photos of one photographer move together).

    A photographer's trip puts dozens of photos in one place, so their hits and
    misses are not independent; treating them as such understates the noise
    several-fold and lets chance gains through.
    """
    return float(clustered_se_rows(np.asarray(d, np.float64)[None, :], groups)[0])


def clustered_se_rows(d: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """:func:`clustered_se` of every row of ``d`` [settings, photos] at once."""
    n = d.shape[1]
    if groups is None:
        return d.std(axis=1) / np.sqrt(n)
    _, inv = np.unique(groups, return_inverse=True)
    g = int(inv.max()) + 1
    if g < 2:
        return np.full(len(d), np.inf)
    # each setting's summed deviation per photographer, summed over the photos sorted by photographer: a dense
    # [photos, photographers] one-hot was 6 GB of a 1M build's peak (40K held-out photos, 20K photographers)
    order = np.argsort(inv, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(inv[order]) != 0])
    sums = np.add.reduceat((d - d.mean(axis=1, keepdims=True))[:, order], starts, axis=1)
    return np.sqrt(g / (g - 1) * (sums ** 2).sum(axis=1)) / n


def within_one_se(per_item: np.ndarray | list[np.ndarray], groups: np.ndarray | None = None,
                  higher_is_better: bool = True, chunk: int = 1024) -> list[int]:
    """Indices of the settings whose mean per-photo score is within one paired standard error of the best one's.

    The standard error is of the per-photo difference to the best setting,
    clustered by photographer when ``groups`` are given. Callers choose among
    these the setting that trusts the image evidence least: a few hundred
    photos from a few dozen photographers cannot tell such settings apart, and
    the extra confidence of the others does not transfer to new photographers
    (measured on Im2GPS3k dev folds).
    """
    x = np.asarray(per_item, np.float64)  # [settings, photos]
    means = x.mean(axis=1)
    sign = 1.0 if higher_is_better else -1.0
    top = int(np.argmax(sign * means))
    out: list[int] = []
    for c in range(0, len(x), chunk):
        se = clustered_se_rows(x[c:c + chunk] - x[top], groups)
        out.extend((c + np.flatnonzero(sign * (means[top] - means[c:c + chunk]) <= se)).tolist())
    return out
