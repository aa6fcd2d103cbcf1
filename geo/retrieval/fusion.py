"""Fusion: one posterior from cell priors, image neighbours and the GPS gallery; one decision.

Each signal is turned into probability mass on points of the globe:

* cells:   the top-K fine cells' hierarchical (f*) probabilities, at their Class2GPS points;
* kNN:     softmax(similarity / T) of the image neighbours, at their coordinates;
* gallery: softmax(score / T) of the top gallery points, at their coordinates.

The mixture ``w_cells * cells + w_knn * knn + w_gallery * gallery`` is the
posterior. The answer is the support point with the most posterior mass
within the field's thresholds (1/25/200/750/2500 km, averaged): at the coarse
thresholds the cells decide the region (PIGEON's "refine within the top
cells"), at the fine ones kNN and gallery support pick the spot inside it.
When the image evidence is weak the cell posterior, which backs off to the
gallery's photo density, dominates, so the answer falls back to the prior;
a near-duplicate concentrates the kNN mass and wins at every threshold.

The weights and temperatures are fitted at build time on photographers held
out from the heads and the gallery (:mod:`geo.splits`), and the answer's
probability of lying within 25/200/750 km is calibrated there with isotonic
regression of the posterior mass.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from geo.geodesy import haversine_km, pairwise_haversine_km

THRESHOLDS_KM = (1.0, 25.0, 200.0, 750.0, 2500.0)
CALIBRATED_KM = ("25", "200", "750")


@dataclass
class FusionParams:
    w_cells: float = 0.4
    w_knn: float = 0.2
    w_gallery: float = 0.2
    w_prior: float = 0.2
    knn_temperature: float = 0.05
    gallery_temperature: float = 1.0
    top_cells: int = 32
    gallery_k: int = 32
    calibration: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FusionParams":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class Evidence:
    """A batch of queries' raw signals, padded to fixed widths, best-first (any width may be 0).

    Padding has similarity/score -inf and probability 0, so it carries no mass.
    """

    knn_latlon: np.ndarray          # [n, k, 2]
    knn_sim: np.ndarray             # [n, k]
    gallery_latlon: np.ndarray      # [n, g, 2]
    gallery_score: np.ndarray       # [n, g]
    cell_latlon: np.ndarray         # [n, c, 2]  top fine cells' Class2GPS points
    cell_prob: np.ndarray           # [n, c]     their hierarchical probabilities
    prior_latlon: np.ndarray        # [n, r, 2]  the densest cells' Class2GPS points (same for every query)
    prior_prob: np.ndarray          # [n, r]     their share of the gallery: the population prior

    def __len__(self) -> int:
        return len(self.knn_sim)

    @property
    def points(self) -> np.ndarray:
        """Support points [n, k + g + c, 2]: every signal's locations, which are also the candidates."""
        return np.concatenate([self.knn_latlon, self.gallery_latlon, self.cell_latlon, self.prior_latlon], axis=1)


@dataclass
class Decision:
    lat: float
    lon: float
    mass: dict[str, float]          # posterior mass within each threshold of the answer
    score: float                    # mean of those masses: the expected share of thresholds met
    alternatives: list[dict[str, float]]


def _softmax_rows(z: np.ndarray, t: float) -> np.ndarray:
    if z.shape[1] == 0:
        return np.zeros_like(z, dtype=np.float64)
    z = z.astype(np.float64) / t
    m = np.max(np.where(np.isfinite(z), z, -np.inf), axis=1, keepdims=True)
    e = np.where(np.isfinite(z), np.exp(z - np.where(np.isfinite(m), m, 0.0)), 0.0)
    s = e.sum(axis=1, keepdims=True)
    return np.divide(e, s, out=np.zeros_like(e), where=s > 0)


def mixture(ev: Evidence, p: FusionParams) -> np.ndarray:
    """Posterior mass [n, k + g + c] on the support points; absent signals' weight goes to the present ones."""
    n = len(ev)
    cells = ev.cell_prob.astype(np.float64).copy()
    cells[:, p.top_cells:] = 0.0
    cs = cells.sum(axis=1, keepdims=True)
    cells = np.divide(cells, cs, out=np.zeros_like(cells), where=cs > 0)
    gal = ev.gallery_score.astype(np.float64).copy()
    gal[:, p.gallery_k:] = -np.inf
    prior = ev.prior_prob / ev.prior_prob.sum(axis=1, keepdims=True).clip(min=1e-12)
    blocks = [_softmax_rows(ev.knn_sim, p.knn_temperature), _softmax_rows(gal, p.gallery_temperature), cells, prior]
    weights = np.array([p.w_knn, p.w_gallery, p.w_cells, p.w_prior], np.float64)
    present = np.stack([b.sum(axis=1) > 0 for b in blocks], axis=1)            # [n, 4]
    w = np.where(present, weights, 0.0)
    fallback = w.sum(axis=1) == 0                                               # every weight on an absent signal
    w[fallback] = present[fallback].astype(np.float64)
    w /= w.sum(axis=1, keepdims=True).clip(min=1e-12)
    return np.concatenate([b * w[:, i:i + 1] for i, b in enumerate(blocks)], axis=1) if n else np.zeros((0, 0))


def within_matrices(ev: Evidence) -> np.ndarray:
    """[n, thresholds, m, m] float32: 1 where support point j lies within the threshold of candidate i."""
    pts = ev.points
    lat, lon = pts[..., 0], pts[..., 1]
    d = haversine_km(lat[:, :, None], lon[:, :, None], lat[:, None, :], lon[:, None, :])
    return np.stack([(d <= t) for t in THRESHOLDS_KM], axis=1).astype(np.float32)


def decide_batch(ev: Evidence, p: FusionParams, within: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(best candidate [n], candidate scores [n, m], mass within each threshold of every candidate [n, T, m])."""
    within = within_matrices(ev) if within is None else within
    mass = mixture(ev, p).astype(np.float32)
    masses = np.einsum("ntcm,nm->ntc", within, mass)
    score = np.where(candidates(ev, p), masses.mean(axis=1), -np.inf)
    return score.argmax(axis=1), score, masses


def candidates(ev: Evidence, p: FusionParams) -> np.ndarray:
    """[n, m] True for real candidates: padding and cells or gallery points beyond the top-K are dropped."""
    g = np.isfinite(ev.gallery_score) & (np.arange(ev.gallery_score.shape[1]) < p.gallery_k)
    c = (ev.cell_prob > 0) & (np.arange(ev.cell_prob.shape[1]) < p.top_cells)
    return np.concatenate([np.isfinite(ev.knn_sim), g, c, ev.prior_prob > 0], axis=1)


def decide(ev: Evidence, p: FusionParams, alternatives: int = 5) -> list[Decision]:
    best, score, masses = decide_batch(ev, p)
    pts = ev.points
    out = []
    for i, b in enumerate(best):
        order = np.argsort(-score[i], kind="stable")
        alts, taken = [], [int(b)]
        for j in order[1:]:
            if len(alts) >= alternatives:
                break
            if (haversine_km(pts[i, j, 0], pts[i, j, 1], pts[i, taken, 0], pts[i, taken, 1]) > 25.0).all():
                alts.append({"lat": float(pts[i, j, 0]), "lon": float(pts[i, j, 1]), "score": round(float(score[i, j]), 5)})
                taken.append(int(j))
        out.append(Decision(float(pts[i, b, 0]), float(pts[i, b, 1]),
                            {str(int(t)): float(masses[i, k, b]) for k, t in enumerate(THRESHOLDS_KM)},
                            float(score[i, b]), alts))
    return out


# ---------------------------------------------------------------- calibration
def fit_isotonic(x: np.ndarray, hit: np.ndarray) -> dict[str, list[float]]:
    """Monotone map posterior mass -> observed frequency, stored as breakpoints for np.interp."""
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(x, hit.astype(float))
    return {"x": [float(v) for v in iso.X_thresholds_], "y": [float(v) for v in iso.y_thresholds_]}


def calibrated(mass: dict[str, float], calibration: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    out = {}
    for t in CALIBRATED_KM:
        c = calibration.get(t)
        out[t] = round(float(np.interp(mass[t], c["x"], c["y"])) if c and c["x"] else mass[t], 4)
    return out


def expected_calibration_error(prob: np.ndarray, hit: np.ndarray, bins: int = 10) -> float:
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(prob, edges) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            ece += sel.mean() * abs(prob[sel].mean() - hit[sel].mean())
    return float(ece)


def reliability_table(prob: np.ndarray, hit: np.ndarray, bins: int = 5) -> list[dict[str, float]]:
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(prob, edges) - 1, 0, bins - 1)
    return [{"bin": f"{edges[b]:.1f}-{edges[b + 1]:.1f}", "n": int((idx == b).sum()),
             "predicted": round(float(prob[idx == b].mean()), 3), "observed": round(float(hit[idx == b].mean()), 3)}
            for b in range(bins) if (idx == b).any()]


# ---------------------------------------------------------------- tuning
def accuracy(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    e = haversine_km(pred[:, 0], pred[:, 1], truth[:, 0], truth[:, 1])
    out = {str(int(t)): float(np.mean(e <= t)) for t in THRESHOLDS_KM}
    out["median_km"] = float(np.median(e))
    return out


def _objective(acc: dict[str, float]) -> tuple[float, float]:
    return (float(np.mean([acc[str(int(t))] for t in THRESHOLDS_KM])), -acc["median_km"])


def grid(has_cells: bool, has_gallery: bool) -> list[FusionParams]:
    """Candidate settings: weights on a simplex (steps of 0.125) over the built signals, temperatures, K.

    The prior (the cells' photo counts) exists only with cells."""
    steps = np.arange(0, 1.0001, 0.125)
    out = []
    for wc, wk, wp in itertools.product(steps if has_cells else [0.0], steps, steps if has_cells else [0.0]):
        wg = 1.0 - wc - wk - wp
        if wg < -1e-9 or (not has_gallery and wg > 1e-9):
            continue
        for kt, gt, tc in itertools.product((0.02, 0.05, 0.1), (0.5, 1.0, 2.0) if has_gallery else (1.0,),
                                            (8, 32) if has_cells else (0,)):
            out.append(FusionParams(float(wc), float(wk), float(max(wg, 0.0)), float(wp), kt, gt, tc))
    return out


def tune(ev: Evidence, truth: np.ndarray, has_cells: bool, has_gallery: bool,
         log=print) -> tuple[FusionParams, dict[str, Any]]:
    """Fit weights/temperatures maximising the mean of the five threshold accuracies, then calibrate."""
    within = within_matrices(ev)
    pts = ev.points
    rows = np.arange(len(ev))
    best, best_obj, best_acc = None, None, None
    for p in grid(has_cells, has_gallery):
        b, _, _ = decide_batch(ev, p, within)
        acc = accuracy(pts[rows, b], truth)
        obj = _objective(acc)
        if best_obj is None or obj > best_obj:
            best, best_obj, best_acc = p, obj, acc
    b, _, masses = decide_batch(ev, best, within)
    pred = pts[rows, b]
    err = haversine_km(pred[:, 0], pred[:, 1], truth[:, 0], truth[:, 1])
    calib, ece, reliability = {}, {}, {}
    for t in CALIBRATED_KM:
        x = masses[rows, THRESHOLDS_KM.index(float(t)), b].astype(np.float64)
        hit = err <= float(t)
        calib[t] = fit_isotonic(x, hit)
        prob = np.interp(x, calib[t]["x"], calib[t]["y"])
        ece[t] = {"raw": round(expected_calibration_error(x, hit), 4),
                  "calibrated": round(expected_calibration_error(prob, hit), 4)}
        reliability[t] = reliability_table(prob, hit)
    best.calibration = calib
    log(f"fusion: w_cells {best.w_cells}, w_knn {best.w_knn}, w_gallery {best.w_gallery}, w_prior {best.w_prior}, "
        f"T_knn {best.knn_temperature}, T_gallery {best.gallery_temperature}, top cells {best.top_cells}")
    return best, {"validation": best_acc, "ece": ece, "reliability": reliability}


# ---------------------------------------------------------------- build stage
FUSION_FILE = "fusion/fusion.json"


def tune_fusion_stage(bundle, group: str | None = None, val_fraction: float = 0.2, seed: int = 0, k: int = 50,
                      stage_options: dict[str, Any] | None = None, log=print) -> dict[str, Any]:
    """Fit fusion on held-out photographers of the gallery; store params, validation scores and calibration.

    Every signal must be scored on photos it has not seen, and the cells'
    priors and Class2GPS means, the gallery's points and density prior, and the
    kNN index all contain the gallery photos themselves. So the held-out
    photographers' rows are scored against a scratch bundle built from the
    other rows with the same stages and options; the stored stages keep every photo.
    """
    import tempfile

    from geo.bundle import Bundle, atomic_write_json
    from geo.index_build.embed import write_shard
    from geo.index_build.knn_index import build_knn_index
    from geo.retrieval.index import CELLS_DECISION_KM, GeoIndex
    from geo.retrieval.knn import kde_vote
    from geo.splits import group_column, validation_mask

    meta, emb = bundle.read_embeddings()
    col = group_column(meta.columns, group)
    val = validation_mask(len(meta), meta[col].astype(str).to_numpy() if col else None, val_fraction, seed)
    has_cells, has_gallery = bundle.has_stage("cells"), bundle.has_stage("gallery")
    if val.sum() < 5 or (~val).sum() < 5:
        log(f"fusion: {int(val.sum())} validation photos are too few to tune; default weights, no calibration")
        params, report = FusionParams(), {"validation": None}
    else:
        quiet = lambda *_: None  # noqa: E731  the scratch build's own logs would repeat the real build's
        with tempfile.TemporaryDirectory(prefix="geo-fusion-") as tmp:
            scratch = Bundle.create_or_resume(tmp, bundle.manifest["backbone"], emb.shape[1])
            write_shard(scratch, 0, meta[~val], emb[~val], {"failed": 0, "seconds": 0.0, "errors": []})
            shard = scratch.embedding_shards()[0]
            scratch.register("embeddings", [shard, shard.with_suffix(".json")], {"ok": int((~val).sum()), "failed": 0})
            build_knn_index(scratch, log=quiet)
            opts = stage_options or {}
            if has_cells:
                from geo.cells.stage import CellsConfig, build_cells_stage

                build_cells_stage(scratch, meta[~val].reset_index(drop=True), emb[~val], CellsConfig(**opts.get("cells", {})), log=quiet)
            if has_gallery:
                from geo.gallery.stage import GalleryConfig, build_gallery_stage

                build_gallery_stage(scratch, meta[~val].reset_index(drop=True), emb[~val], GalleryConfig(**opts.get("gallery", {})), log=quiet)
            index = GeoIndex(scratch)
            ev, _ = index.evidence(emb[val], k=k)
            knn_params = index.knn_params
            cells_answer = np.stack(index.cells.decide(index.cell_probs(emb[val]), CELLS_DECISION_KM)[:2], -1) if has_cells else None
        truth = meta[["lat", "lon"]].to_numpy(np.float64)[val]
        params, report = tune(ev, truth, has_cells, has_gallery, log=log)
        finite = np.isfinite(ev.knn_sim)
        singles = {"knn": np.array([[v.lat, v.lon] for v in (
            kde_vote(ev.knn_latlon[i, finite[i], 0], ev.knn_latlon[i, finite[i], 1], ev.knn_sim[i, finite[i]], knn_params)
            for i in range(len(ev)))])}
        if has_gallery:
            singles["gallery"] = ev.gallery_latlon[:, 0]
        if has_cells:
            singles["cells"] = cells_answer
            singles["prior"] = ev.prior_latlon[:, 0]
        report["single_modes"] = {m: accuracy(p, truth) for m, p in singles.items()}
        report["n_validation"] = int(val.sum())
        for m, a in {**report["single_modes"], "fused": report["validation"]}.items():
            log(f"fusion validation {m:>8}: " + " ".join(f"{t}km {100 * a[t]:.1f}%" for t in ("1", "25", "200", "750", "2500"))
                + f"  median {a['median_km']:.0f} km")
    info = {"params": params.to_dict(), "group_column": col, "val_fraction": val_fraction, "seed": seed, **report}
    atomic_write_json(bundle.path(FUSION_FILE), info)
    bundle.register("fusion", [FUSION_FILE], {"params": params.to_dict(), "validation": report.get("validation"),
                                              "single_modes": report.get("single_modes"), "ece": report.get("ece")},
                    replace_prefix="fusion/")
    return info
