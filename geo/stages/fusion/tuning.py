"""Fitting fusion: a grid over the signals present, scored on out-of-fold evidence, chosen by the one-SE rule.

The grid comes from the signals' specs: weights on a simplex (steps of 1/8)
over every signal present, each "logits" signal's temperatures, each signal's
top-K choices, and the decision rules. A setting's score per photo is the
share of the field's thresholds its answer meets. Tuning data are a few
hundred photos of a few dozen photographers and the best of thousands of
settings is optimistic, so the choice backs off to the prior unless the best
clearly beats it (:func:`select_one_se`).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable

import numpy as np

from geo.core.geodesy import THRESHOLDS_KM, haversine_km, thresholds_met
from geo.core.splits import clustered_se, within_one_se
from geo.stages.fusion.calibration import (
    CALIBRATED_KM,
    expected_calibration_error,
    fit_isotonic,
    reliability_table,
)
from geo.stages.fusion.posterior import (DECISIONS, FusionParams, SignalParams, backoff_only, candidates, closeness,
                                         coverage, decide_batch, mass_near, near_duplicate, present, signal_mass)
from geo.stages.fusion.signals import BACKOFF_SIGNAL, DUPLICATE_SIGNAL, Evidence, SignalSpec

WEIGHT_STEPS = 8  # weights move in steps of 1/8


def accuracy(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    e = haversine_km(pred[:, 0], pred[:, 1], truth[:, 0], truth[:, 1])
    out = {str(t): float(np.mean(e <= t)) for t in THRESHOLDS_KM}
    out["median_km"] = float(np.median(e))
    return out


def grid(specs: list[SignalSpec]) -> list[FusionParams]:
    """Every candidate setting for these signals (weights sum to 1)."""
    names = [s.name for s in specs]
    settings = []
    for steps in itertools.product(range(WEIGHT_STEPS + 1), repeat=len(specs) - 1):
        rest = WEIGHT_STEPS - sum(steps)
        if rest < 0:
            continue
        weights = [*steps, rest]
        per_signal = [[(t, k) for t in (s.temperatures if s.kind == "logits" else (s.default_temperature,))
                       for k in s.top_ks] for s in specs]
        for choice in itertools.product(*per_signal, DECISIONS):
            *tk, decision = choice
            settings.append(FusionParams({n: SignalParams(w / WEIGHT_STEPS, t, k) for n, w, (t, k)
                                          in zip(names, weights, tk)}, decision=decision))
    return settings


def select_one_se(per_photo: np.ndarray, settings: list[FusionParams], specs: list[SignalSpec],
                  groups: np.ndarray | None = None) -> FusionParams:
    """Back off to the prior unless the evidence clearly beats it; then the most prudent setting close to the best.

    ``per_photo`` is each setting's per-photo score [settings, photos]. The best setting
    must beat the prior alone (the best constant guess) by two paired standard
    errors (clustered by photographer when ``groups`` are given; on the
    Im2GPS3k dev folds the arg-max lost 8 points at 2500 km on new
    photographers); if it does, the choice is the setting within one standard
    error of the best that leans most on the most prudent signals.
    """
    per_photo = np.asarray(per_photo, np.float64)
    means = per_photo.mean(axis=1)
    top = int(np.argmax(means))
    backoff = [i for i, p in enumerate(settings) if backoff_only(p)]
    if backoff and means[top] - means[backoff[0]] <= 2 * clustered_se(per_photo[top] - per_photo[backoff[0]], groups):
        return settings[backoff[0]]
    prudent = [s.name for s in sorted(specs, key=lambda s: -s.prudence) if s.prudence > 0]
    ok = within_one_se(per_photo, groups)
    return settings[max(ok, key=lambda i: (*(settings[i].weight(n) for n in prudent), means[i]))]


def duplicate_threshold(ev: Evidence, quantile: float = 1.0, margin: float = 0.02, default: float = 0.95) -> float:
    """A similarity above what photos of *other* photographers reach (out-of-fold top-1 similarities).

    Tuning data is photographer-disjoint, so it never shows what a near-duplicate
    is worth; this threshold marks where such matches begin instead.
    """
    if DUPLICATE_SIGNAL not in ev.signals:
        return default
    s = ev.signals[DUPLICATE_SIGNAL].score
    top = np.max(np.where(np.isfinite(s), s, -np.inf), axis=1)
    top = top[np.isfinite(top)]
    return float(min(0.99, np.quantile(top, quantile) + margin)) if len(top) else default


def share_met(points: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """[n, m]: the share of the thresholds an answer at each candidate would meet (NaN padding meets none)."""
    return thresholds_met(haversine_km(points[..., 0], points[..., 1], truth[:, None, 0], truth[:, None, 1]))


def score_grid(ev: Evidence, truth: np.ndarray, settings: list[FusionParams], chunk: int = 256) -> np.ndarray:
    """Per-photo score (share of thresholds met) of every setting, [settings, photos]: the answers
    :func:`decide_batch` gives, at once.

    Settings that share their signals' temperatures and top-K share the signals'
    coverages; within such a group a setting differs only by its weights and
    decision rule, and a candidate's score is linear in both, so the group is
    scored with one batched product over all its settings instead of a mixture
    per setting (the grid's cost falls from its size times the mixture to a
    matrix product). Weights are renormalised per photo over the signals present
    (absent ones give theirs to the rest, as in :func:`signal_weights`);
    near-duplicate photos are answered from the kNN signal alone with every
    threshold counted, whatever the setting. The sum runs in another order than
    decide_batch's, so where two candidates' scores agree to float precision
    either may be picked: both are the decision's best answer.
    """
    c = closeness(ev)
    share = share_met(ev.points, truth)
    names = ev.names
    blocks = dict(zip(names, ev.blocks()))
    have = np.stack([present(s, ev.signals[s.name].score) for s in ev.specs], axis=1).astype(np.float32)  # [n, S]
    decisions = {d: (v := np.asarray(u, np.float32)) / v.sum() for d, u in DECISIONS.items()}
    cache: dict[tuple, np.ndarray] = {}
    out = np.empty((len(settings), len(ev)))
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(settings):
        groups.setdefault(tuple((n, p.signals[n].temperature, p.signals[n].top_k) for n in names), []).append(i)
    weight_cache: dict[tuple, np.ndarray] = {}

    def weights_for(idx: tuple[int, ...]) -> np.ndarray:
        """[n, K, S] each photo's weights under each setting: renormalised over the signals present."""
        key = tuple(tuple(settings[i].weight(n) for n in names) for i in idx)
        if key not in weight_cache:
            w = np.array(key, np.float32)
            wr = w[None, :, :] * have[:, None, :]  # absent signals carry no weight
            none = wr.sum(axis=2) == 0
            wr = np.where(none[..., None], have[:, None, :], wr)  # no weight on a present signal: all of them
            weight_cache[key] = wr / wr.sum(axis=2, keepdims=True).clip(min=1e-12)
        return weight_cache[key]

    for key, members in groups.items():
        p0 = settings[members[0]]
        cov = []
        for s, (name, t, k) in zip(ev.specs, key):
            if (name, t, k) not in cache:
                cache[(name, t, k)] = coverage(c, blocks[name], signal_mass(s, ev.signals[name].score, SignalParams(0.0, t, k)))
            cov.append(cache[(name, t, k)])
        cov = np.ascontiguousarray(np.stack(cov, axis=1).transpose(0, 1, 3, 2))  # [n, S, m, T]
        allowed = candidates(ev, p0)
        penalty = np.where(allowed, 0.0, -np.inf).astype(np.float32)
        dup = near_duplicate(ev, p0)
        dup_best = None
        if dup.any():  # all weight on kNN, every threshold: the same answer under every setting of the group
            knn = names.index(DUPLICATE_SIGNAL)
            z = cov[dup, knn] @ decisions["all"]
            dup_best = np.where(allowed[dup], z, -np.inf).argmax(axis=1)
        by_decision: dict[str, list[int]] = {}
        for i in members:
            by_decision.setdefault(settings[i].decision, []).append(i)
        for decision, idx in by_decision.items():
            # Linearity: sum_t u_t sum_s w_s cov_s,t = sum_s w_s (sum_t u_t cov_s,t): one [n, S, m] per decision,
            # then a batched product with every setting's weights instead of a mixture per setting.
            per_signal = cov @ decisions[decision]  # [n, S, m]
            wr = weights_for(tuple(idx))  # [n, K, S], the same for every group
            best = np.empty((len(ev), len(idx)), np.int64)
            for r0 in range(0, len(ev), chunk):
                rows = slice(r0, r0 + chunk)
                z = np.matmul(wr[rows], per_signal[rows])  # [r, K, m]
                z += penalty[rows, None, :]
                best[rows] = z.argmax(axis=2)
            if dup_best is not None:
                best[dup] = dup_best[:, None]
            out[idx] = np.take_along_axis(share, best, axis=1).T
    return out


def tune(ev: Evidence, truth: np.ndarray, groups: np.ndarray | None = None,
         log: Callable[[str], None] = print) -> tuple[FusionParams, dict[str, Any]]:
    """The setting maximising the mean of the threshold accuracies (one-SE rule), then its calibration."""
    settings = grid(ev.specs)
    dup = duplicate_threshold(ev)
    for p in settings:
        p.duplicate_similarity = dup
    best = select_one_se(score_grid(ev, truth, settings), settings, ev.specs, groups)
    report = calibrate(ev, best, truth)
    log("fusion: " + ", ".join(f"{n} w {sp.weight:g}" + (f" T {sp.temperature:g}" if s.kind == "logits" else "")
                               + (f" top {sp.top_k}" if sp.top_k else "")
                               for s in ev.specs for n, sp in [(s.name, best.signals[s.name])])
        + f"; decision {best.decision}; near-duplicate at similarity >= {best.duplicate_similarity:.3f}")
    return best, report


def calibrate(ev: Evidence, p: FusionParams, truth: np.ndarray) -> dict[str, Any]:
    """Set ``p.calibration`` (posterior mass within 25/200/750 km of the answer -> observed frequency, isotonic)
    and return the setting's out-of-fold accuracy and calibration errors."""
    rows = np.arange(len(ev))
    b, _, masses = decide_batch(ev, p)
    pred = ev.points[rows, b]
    err = haversine_km(pred[:, 0], pred[:, 1], truth[:, 0], truth[:, 1])
    calib, ece, reliability = {}, {}, {}
    for t in CALIBRATED_KM:
        x = masses[rows, THRESHOLDS_KM.index(int(t)), b].astype(np.float64)
        hit = err <= float(t)
        calib[t] = fit_isotonic(x, hit)
        prob = np.interp(x, calib[t]["x"], calib[t]["y"])
        ece[t] = {"raw": round(expected_calibration_error(x, hit), 4),
                  "calibrated": round(expected_calibration_error(prob, hit), 4)}
        reliability[t] = reliability_table(prob, hit)
    p.calibration = calib
    return {"validation": accuracy(pred, truth), "ece": ece, "reliability": reliability}


def restricted(p: FusionParams, mode: str) -> FusionParams:
    """The fused setting that mixes only what the backed-off ``mode`` mixes (its weights, temperatures and
    decision); the other signals keep their top-K as candidates but carry no weight."""
    r = FusionParams.from_dict(p.mode_fusion[mode])
    signals = {n: r.signals.get(n, SignalParams(0.0, sp.temperature, sp.top_k)) for n, sp in p.signals.items()}
    return dataclasses.replace(p, signals=signals, decision=r.decision, calibration={})


def no_worse_than_restrictions(ev: Evidence, p: FusionParams, truth: np.ndarray,
                               log: Callable[[str], None] = print) -> tuple[FusionParams, dict[str, Any]]:
    """The fused setting, or the restriction of it to one backed-off mode's signals where that scores higher
    out of fold: with more signals in its grid, the one-SE choice can fall back to the prior where a
    restriction of itself does not (Im2GPS3k dev: cells 9.0 % within 200 km, fused 5.5 %), and a fused mode
    must never be worse than one of its own parts. Returns the setting and its report (calibrated again)."""
    options = {"fused": p, **{m: restricted(p, m) for m in p.mode_fusion}}
    share = share_met(ev.points, truth)
    rows = np.arange(len(ev))
    means = {m: float(share[rows, decide_batch(ev, q)[0]].mean()) for m, q in options.items()}
    pick = max(options, key=lambda m: (means[m] > means["fused"], means[m]))
    if pick != "fused":
        log(f"fusion: the mixture of {pick} and the prior alone meets {100 * means[pick]:.1f}% of the thresholds "
            f"out of fold against {100 * means['fused']:.1f}% for every signal; the fused mode answers with it")
    chosen = options[pick]
    return chosen, {**calibrate(ev, chosen, truth), "restriction": None if pick == "fused" else pick,
                    "restriction_scores": {m: round(v, 4) for m, v in means.items()}}


BACKED_OFF_MODES = ("knn", "cells", "gallery")


def tune_backed_off_modes(ev: Evidence, truth: np.ndarray, groups: np.ndarray | None,
                          singles: dict[str, np.ndarray]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """For the kNN, cells and gallery modes: their signal and the prior alone, tuned like the fused mode (the same
    grid and one-SE back-off), so the mode answers from its signal only where that beats the constant guess
    on other photographers. Updates ``singles`` with the backed-off answers; returns the params (as dicts) and
    each mode's out-of-fold accuracy."""
    params, report = {}, {}
    for mode in BACKED_OFF_MODES:
        if mode not in ev.names or BACKOFF_SIGNAL not in ev.names:
            continue
        keep = (mode, BACKOFF_SIGNAL)
        sub = Evidence([s for s in ev.specs if s.name in keep], {n: ev.signals[n] for n in keep})
        best, rep = tune(sub, truth, groups, log=lambda m: None)
        b, _, _ = decide_batch(sub, best)
        singles[mode] = sub.points[np.arange(len(sub)), b]
        params[mode] = best.to_dict()
        report[mode] = {"weights": {n: best.weight(n) for n in keep}, "validation": rep["validation"]}
    return params, report


def calibrate_modes(ev: Evidence, p: FusionParams, singles: dict[str, np.ndarray],
                    truth: np.ndarray) -> tuple[dict[str, dict[str, dict[str, list[float]]]], dict[str, Any]]:
    """Isotonic calibration of each single mode's p_within on the out-of-fold photos: the mode's own signal
    mass within 25/200/750 km of its answer -> how often its answer was that close. Returns the maps and their
    expected calibration error before and after."""
    maps: dict[str, dict[str, dict[str, list[float]]]] = {}
    ece: dict[str, Any] = {}
    for mode, answers in singles.items():
        if mode not in ev.names or mode == BACKOFF_SIGNAL:
            continue
        x_all = mass_near(ev, p, mode, answers)
        err = haversine_km(answers[:, 0], answers[:, 1], truth[:, 0], truth[:, 1])
        maps[mode], ece[mode] = {}, {}
        for t in CALIBRATED_KM:
            x, hit = x_all[:, THRESHOLDS_KM.index(int(t))], err <= float(t)
            maps[mode][t] = fit_isotonic(x, hit)
            prob = np.interp(x, maps[mode][t]["x"], maps[mode][t]["y"])
            ece[mode][t] = {"raw": round(expected_calibration_error(x, hit), 4),
                            "calibrated": round(expected_calibration_error(prob, hit), 4)}
    return maps, ece

