"""Learned scorers for fusion's candidates, cross-fitted by photographer on a bundle's held-out evidence.

    python benchmarks/eval_rerankers.py --bundle B --evidence /tmp/ev.pkl --group AUTHOR [--max-queries 3000]
        [--slow]

The evidence is what ``fit_fusion_on_built`` hands the reranker: the held-out photographers' photos scored
against the built stages without them (computed once and kept in ``--evidence``, a pickle this script itself
wrote). Every scorer is fitted on two photographer folds and ranks the third's candidates; each row is
compared, photo by photo, with the mixture's answer (share = mean of the five accuracies; gain ± one
photographer-clustered SE). ``--slow`` adds one classifier per threshold and the listwise softmax models
(tens of minutes on two cores). The build keeps the best of the regressor's own pick and "region then spot"
at 200 and 750 km (``geo.stages.fusion.rerank``; REGION_KMS), then backs off to the constant guess below a
score threshold chosen out of fold (the "+ constant guess" rows: each fold's photos switched by the threshold
the other folds chose).
"""
from __future__ import annotations

import argparse
import os
import pickle
import time
from typing import Callable

import numpy as np

from geo.core.geodesy import THRESHOLDS_KM, haversine_km, thresholds_met
from geo.core.splits import clustered_se, group_folds
from geo.stages.fusion import rerank as R
from geo.stages.fusion.stage import FusionModel
from geo.store.bundle import open_bundle


def held_out_evidence(bundle: str, group: str, max_queries: int) -> tuple:
    """(evidence, single modes, truth, groups) exactly as the build's fusion stage receives them."""
    import geo.stages.fusion.stage as stage
    from geo.pipeline import TrainingData, _tune_fusion
    from geo.settings import StageConfigs
    from geo.store.embeddings import EmbeddingReader

    got = {}

    def grab(ev, singles, truth, groups, *_):
        got["ev"] = (ev, singles, truth, groups)
        raise StopIteration

    stage._tuned, b = grab, open_bundle(bundle)
    configs = StageConfigs(group_column=group).resolved()
    configs.fusion.max_queries, configs.fusion.single_split_above = max_queries, 0
    reader = EmbeddingReader(b)
    try:
        _tune_fusion(b, reader, TrainingData.read(reader, b, configs, sample=False), configs, print)
    except StopIteration:
        pass
    return got["ev"]


class Bench:
    def __init__(self, ev, truth, groups, params):
        self.n, self.groups = len(ev), groups
        self.d, self.fallback_km = R._rows(ev, params, truth)
        self.y = self.d.share()
        self.mix = R._best(self.d, self.d.mixture.astype(float), self.n)
        self.fold = group_folds(self.n, groups, 3, 0)
        self.dup = R.near_duplicate(ev, params)

    def line(self, name: str, rows: np.ndarray, t0: float | None = None, km: np.ndarray | None = None) -> None:
        km = self.d.km[rows] if km is None else km
        y = thresholds_met(km)
        acc = " | ".join(f"{100 * np.mean(km <= t):.1f}" for t in THRESHOLDS_KM)
        gain = "" if t0 is None else (f" | {100 * (y - self.y[self.mix]).mean():+.2f} ± "
                                      f"{100 * clustered_se(y - self.y[self.mix], self.groups):.2f} ({time.time() - t0:.0f} s)")
        print(f"| {name} | {acc} | {100 * y.mean():.2f}{gain} |", flush=True)

    def crossfit(self, fit: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Each fold's candidate scores from ``fit(train_flat_rows) -> scores of every flat row``."""
        pred = np.full(len(self.y), -np.inf)
        for f in range(3):
            held = self.fold[self.d.query] == f
            pred[held] = fit(R._sample(self.d, (self.fold != f) & ~self.dup, 0))[held]
        return pred

    def chosen(self, pred: np.ndarray) -> np.ndarray:
        return np.where(self.dup, self.mix, R._best(self.d, pred, self.n))

    def within(self, ranked: np.ndarray, reach_km: float) -> np.ndarray:
        """The mixture's best candidate within ``reach_km`` of the ranker's pick."""
        d = self.d
        centre = d.latlon[ranked[d.query]]
        near = haversine_km(d.latlon[:, 0], d.latlon[:, 1], centre[:, 0], centre[:, 1]) <= reach_km
        return np.where(self.dup, self.mix, R._best(d, np.where(near, d.mixed, -np.inf), self.n))


def _regressor(b: Bench, **kw) -> Callable[[np.ndarray], np.ndarray]:
    from sklearn.ensemble import HistGradientBoostingRegressor

    def fit(train: np.ndarray) -> np.ndarray:
        if not kw:
            return R._fit(b.d.x[train], b.y[train], 0)[0].predict(b.d.x)
        return HistGradientBoostingRegressor(random_state=0, early_stopping=False, **kw).fit(
            b.d.x[train], b.y[train]).predict(b.d.x)
    return fit


def _per_threshold(b: Bench) -> Callable[[np.ndarray], np.ndarray]:
    from sklearn.ensemble import HistGradientBoostingClassifier

    def fit(train: np.ndarray) -> np.ndarray:
        out = np.zeros(len(b.y))
        for t in THRESHOLDS_KM:
            hit = b.d.km[train] <= t
            if hit.all() or not hit.any():
                out += float(hit.mean())
                continue
            model = HistGradientBoostingClassifier(random_state=0, early_stopping=False, max_iter=100,
                                                   max_leaf_nodes=15, min_samples_leaf=40).fit(b.d.x[train], hit)
            out += model.predict_proba(b.d.x)[:, 1]
        return out
    return fit


def _listwise(b: Bench, hidden: int = 0, l2: float = 1e-3) -> Callable[[np.ndarray], np.ndarray]:
    """A softmax over each query's candidates maximising the expected share (features and their logs)."""
    import torch

    d = b.d
    x = np.concatenate([d.x, np.log(np.clip(d.x, 1e-6, None))], axis=1).astype(np.float64)
    counts = np.bincount(d.query, minlength=b.n)
    pos = np.arange(len(d.query)) - np.concatenate([[0], np.cumsum(counts)[:-1]])[d.query]

    def fit(train: np.ndarray) -> np.ndarray:
        queries = np.unique(d.query[train])
        rows = np.isin(d.query, queries)
        mu, sd = x[rows].mean(0), x[rows].std(0) + 1e-6
        xp = np.zeros((b.n, counts.max(), x.shape[1]), np.float32)
        yp, mask = np.zeros(xp.shape[:2], np.float32), np.zeros(xp.shape[:2], bool)
        xp[d.query, pos], yp[d.query, pos], mask[d.query, pos] = (x - mu) / sd, b.y, True
        torch.manual_seed(0)
        net = (torch.nn.Linear(x.shape[1], 1) if hidden == 0 else
               torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)))
        opt = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=l2)
        xt, yt, mt = (torch.tensor(a[queries]) for a in (xp, yp, mask))
        for _ in range(300):
            s = net(xt).squeeze(-1).masked_fill(~mt, -1e9)
            loss = -(torch.softmax(s, 1) * yt).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return net(torch.tensor(xp)).squeeze(-1).numpy()[d.query, pos]
    return fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--evidence", required=True, help="where the held-out evidence is kept (made on first run)")
    ap.add_argument("--group", default="AUTHOR")
    ap.add_argument("--max-queries", type=int, default=3000)
    ap.add_argument("--slow", action="store_true")
    a = ap.parse_args()
    if not os.path.exists(a.evidence):
        with open(a.evidence, "wb") as f:
            pickle.dump(held_out_evidence(a.bundle, a.group, a.max_queries), f, protocol=5)
    with open(a.evidence, "rb") as f:
        ev, _, truth, groups = pickle.load(f)  # noqa: S301  (this script's own file)
    b = Bench(ev, truth, groups, FusionModel.load(open_bundle(a.bundle)).params)
    print(f"| answer | {' | '.join(f'{t} km' for t in THRESHOLDS_KM)} | share | gain |\n|---|" + "---|" * 7)
    b.line("mixture", b.mix)
    b.line("oracle: best candidate in the pool", R._best(b.d, b.y - 1e-6 * b.d.km, b.n))
    t0 = time.time()
    shipped = b.crossfit(_regressor(b))
    b.line("regressor on share", b.chosen(shipped), t0)
    top = shipped[R._best(b.d, shipped, b.n)]
    for reach in (0, 200, 750):
        rows = b.within(R._best(b.d, shipped, b.n), reach) if reach else b.chosen(shipped)
        if reach:
            b.line(f"region then spot, {reach} km", rows, t0)
        _, backed = R._backoff(top, b.d.km[rows], b.fallback_km, b.fold, b.dup)
        b.line(f"{'own pick' if not reach else f'{reach} km'} + constant guess below a score ({100 * backed.mean():.0f}%)",
               rows, t0, np.where(backed, b.fallback_km, b.d.km[rows]))
    t0 = time.time()
    b.line("larger regressor", b.chosen(b.crossfit(_regressor(b, max_iter=300, learning_rate=0.05, max_leaf_nodes=31,
                                                              min_samples_leaf=100, l2_regularization=1.0))), t0)
    if a.slow:
        for name, fit in (("one classifier per threshold", _per_threshold(b)),
                          ("listwise linear softmax", _listwise(b)), ("listwise MLP (32)", _listwise(b, 32))):
            t0 = time.time()
            b.line(name, b.chosen(b.crossfit(fit)), t0)


if __name__ == "__main__":
    main()
