"""The cells stage: partitions, cell tables, heads, calibration, support spots.

:func:`fit_cells` does the work in memory and returns the artifact
(:class:`geo.stages.cells.predictor.CellPredictor`), whose ``save`` writes its files.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from geo.core.geodesy import latlon_to_xyz, valid_latlon, xyz_to_latlon
from geo.core.splits import group_column, group_folds
from geo.data.countries import country_index
from geo.models.heads import head_logits
from geo.stages.cells import partition as P
from geo.stages.cells.calibration import CALIBRATION_PHOTOS, fine_log_posterior, fit_calibration, log_priors
from geo.stages.cells.cities import CityHead, fit_city_head
from geo.stages.cells.predictor import CellPredictor
from geo.stages.cells.region import CHUNK, RegionCells, conformal_map, map_summary
from geo.stages.cells.regression import Regression, fit_regression
from geo.stages.cells.support import support_points
from geo.stages.cells.train import HeadConfig, TrainResult, config_dict, train_heads

if TYPE_CHECKING:
    import pandas as pd

CROSSFIT_FOLDS = 3
REGION_PHOTOS = 20_000  # held-out photos the regions' conformal map is fitted on: its quantiles' error ~0.2 %
REGION_BLOCK = 4096  # held-out photos whose logits the regions' map holds at once


@dataclass
class CellsConfig:
    """Options of the cells stage (``geo build-index`` flags of the same names)."""

    cells: list[str] = field(default_factory=list)  # published GeoEstimation cell CSVs, coarse to fine, instead of building
    partitioner: str = "adaptive"  # adaptive (PlaNet top-down) | bottomup (seed 002 hot spots) | semantic (PIGEON)
    tau_min: int | None = None  # default: 50 scaled by sqrt(gallery / 4.7 M), at least 2
    tau_max: list[int] = field(default_factory=list)  # one per partition; default 5000 2000 1000 scaled like tau_min
    head: str = "linear"  # linear | mlp
    scene_column: str | None = None  # manifest column with scene labels (e.g. S3_Label) to condition the heads on
    group_column: str | None = None  # photographers held out together (default: AUTHOR, owner, ... when present)
    smoothing_km: float = 0.0  # haversine label smoothing scale (PIGEON uses 75; 0 = off)
    max_epochs: int = 100
    seed: int = 0
    device: str = "auto"
    # Calibrate small galleries on every photo, scored by heads trained without its photographer's fold.
    # Fusion's out-of-fold fits turn it off: its folds are already photographer-disjoint.
    crossfit: bool = True
    # The coordinate regression, the city head and the regions' map answer users (--mode regression, an answer's
    # cities and region), not fusion: fusion's out-of-fold fits leave them out.
    answer_heads: bool = True


def _partitions(lat, lon, sample, config: CellsConfig, country: np.ndarray | None) -> tuple[list[P.Partition], dict]:
    """The partitions from every photo's coordinates (the bottom-up partitioner, which ranks cells by image
    features, from the training sample's: ``sample`` is its (lat, lon, emb)); ``country``: the photos'."""
    if config.cells:
        parts = P.read_partitions(config.cells)
        return parts, {"source": [str(c) for c in config.cells]}
    default_min, default_max = P.default_taus(len(lat))
    tau_min = config.tau_min if config.tau_min is not None else default_min
    tau_max = list(config.tau_max) or [t for t in default_max if t >= tau_min]
    if config.partitioner == "bottomup":
        lat, lon, emb = sample
        parts = P.build_partitions(lat, lon, tau_min, tau_max, config.partitioner, emb, seed=config.seed)
    else:
        parts = P.build_partitions(lat, lon, tau_min, tau_max, config.partitioner, seed=config.seed, country=country)
    return parts, {"source": config.partitioner, "tau_min": tau_min, "tau_max": sorted(tau_max, reverse=True)}


def fit_cells(meta: pd.DataFrame, emb: np.ndarray, config: CellsConfig = CellsConfig(),
              log: Callable[[str], None] = print, val: np.ndarray | None = None,
              photos: tuple[np.ndarray, np.ndarray] | None = None) -> CellPredictor:
    """Partitions + tables + trained, calibrated heads + support spots: the stage's artifact, in memory.

    ``meta``/``emb`` are the photos the heads train on: the whole gallery, or on a large one the pipeline's
    bounded training sample, with ``val`` marking its held-out photographers (default: the shared
    :func:`geo.core.splits.validation_mask`). ``photos`` are every gallery photo's (lat, lon), from which the
    partitions, the cells' counts and means and the support spots are made (default: ``meta``'s).
    """
    meta, emb, val, (all_lat, all_lon) = _located(meta, emb, val, photos)
    lat, lon = meta["lat"].to_numpy(float), meta["lon"].to_numpy(float)
    cells = _cells(all_lat, all_lon, (lat, lon, emb), config, sampled=photos is not None)
    log("cells: " + ", ".join(f"{p.name} {p.n_cells} cells ({(cells.all_rows[:, k] >= 0).mean():.0%} of photos)"
                              for k, p in enumerate(cells.parts)) + f" from {cells.source}"
        + (f"; heads train on a sample of {len(lat):,} of {len(all_lat):,} photos" if len(lat) < len(all_lat) else ""))

    scene, scene_values = _scenes(meta, config.scene_column)
    group_col = group_column(meta.columns, config.group_column)
    hc = HeadConfig(head=config.head, smoothing_km=config.smoothing_km, max_epochs=config.max_epochs, seed=config.seed,
                    device=config.device)
    groups = meta[group_col].astype(str).to_numpy() if group_col else None
    result = train_heads(emb, cells.rows, cells.cell_latlon, (lat, lon), hc, groups=groups, scene=scene,
                         n_scenes=len(scene_values), val=val)
    val = result.val_index
    calibration = _calibrate(result, emb, cells, (lat, lon), hc, groups, scene, len(scene_values), config.crossfit,
                             config.answer_heads)
    log(f"cells: heads trained in {result.seconds:.1f}s ({result.best_epoch + 1} epochs kept), "
        f"T={['%.2f' % t for t in calibration['temperature']]}, alpha={calibration['alpha']:.2f} "
        f"on {calibration['val_photos']} photos from {calibration['source']}"
        + (f" (by {group_col})" if group_col else ""))
    if "region" in calibration:
        log("cells: region thresholds (stated coverage: posterior mass) "
            + ", ".join(f"{c}: {m:.3f}" for c, m in map_summary(calibration["region"])["mass"].items())
            + f" on {calibration['region']['photos']} held-out photos"
            + (f", in {len(calibration['region']['top']) + 1} bins of confidence" if "top" in calibration["region"]
               else ""))
    info = {
        "partitions": [p.name for p in cells.parts],
        "cells": {p.name: p.n_cells for p in cells.parts},
        **cells.source,
        "head": hc.head,
        "scene_column": config.scene_column,
        "group_column": group_col,
        "photos": int(len(all_lat)),
        "trained_on": int(len(lat)),
        "calibration": {**calibration, **({"region": map_summary(calibration["region"])} if "region" in calibration
                                          else {})},
        "train": {"seconds": round(result.seconds, 2), "best_epoch": result.best_epoch,
                  "epochs_run": len(result.history), "val_photos": int(len(val)),
                  "val_loss": result.history[result.best_epoch]["val_loss"], "config": config_dict(hc)},
    }
    support = support_points(all_lat, all_lon, cells.all_rows[:, -1], cells.tables[-1])
    info["support_spots"] = int(len(support))
    regression = city = None
    if config.answer_heads:
        regression = _regression(emb, lat, lon, groups, config.seed, log)
        info["regression"] = regression.info
        city = _city_head(emb, lat, lon, val, int(cells.source.get("tau_min", 1)), hc, groups, log)
        info["city_head"] = city.info if city is not None else None
    return CellPredictor(cells.tables, info["partitions"], result.model, calibration, scene_values, support, info,
                         config.scene_column, regression, city)


def _located(meta: pd.DataFrame, emb: np.ndarray, val: np.ndarray | None,
             photos: tuple[np.ndarray, np.ndarray] | None) -> tuple[pd.DataFrame, np.ndarray, np.ndarray | None,
                                                                   tuple[np.ndarray, np.ndarray]]:
    """The training photos with valid coordinates (their ``meta``, ``emb``, ``val``), and every gallery photo's
    valid (lat, lon): a photo without a place has no cell to learn or to count."""
    if len(meta) != len(emb):
        raise ValueError(f"{len(meta)} metadata rows for {len(emb)} embeddings")
    ok = valid_latlon(meta["lat"], meta["lon"])
    if not ok.all():
        meta, emb = meta.loc[ok].reset_index(drop=True), emb[ok]
        val = val[ok] if val is not None else None
    if photos is None:
        return meta, emb, val, (meta["lat"].to_numpy(float), meta["lon"].to_numpy(float))
    keep = valid_latlon(*photos)
    return meta, emb, val, (np.asarray(photos[0], float)[keep], np.asarray(photos[1], float)[keep])


@dataclass
class _Cells:
    """The partitions and what the photos' coordinates make of them."""

    parts: list[P.Partition]
    source: dict  # where the partitions came from (and the taus they were built with): recorded in the info
    parents: dict  # P.link_parents: each partition's cells' rows in the coarser partitions
    tables: list[pd.DataFrame]  # per partition: each cell's photo count, mean place and parent
    all_rows: np.ndarray  # int [every gallery photo, partitions]: its cell's row, -1 in none
    rows: np.ndarray  # the same for the photos the heads train on

    @property
    def cell_latlon(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each partition's cell means: what the heads' smoothed targets measure distances to."""
        return [(t["lat"].to_numpy(), t["lon"].to_numpy()) for t in self.tables]


def _cells(all_lat: np.ndarray, all_lon: np.ndarray, sample: tuple[np.ndarray, np.ndarray, np.ndarray],
           config: CellsConfig, sampled: bool) -> _Cells:
    """Partitions and tables from every gallery photo, each training photo (``sample``: lat, lon, emb) located
    in them: counts and means describe the whole gallery even when the heads see only a sample (``sampled``).

    Semantic cells test each photo's country once (44 s a million photos before the lookup was a tree, and
    still the partitioner's largest single pass): the partitioner and the photos' cells share the answer, and
    the sample's photos, which are gallery photos, take the rows already found for their coordinates."""
    country = country_index(all_lat, all_lon) if config.partitioner == "semantic" and not config.cells else None
    parts, source = _partitions(all_lat, all_lon, sample, config, country)
    parents = P.link_parents(parts)
    all_rows = P.locate(parts, all_lat, all_lon, country)
    rows = _rows_at(parts, sample[0], sample[1], (all_lat, all_lon, all_rows)) if sampled else all_rows
    by_name = {p.name: p for p in parts}
    tables = [P.cell_table(p, all_rows[:, k], all_lat, all_lon, parents[p.name], by_name) for k, p in enumerate(parts)]
    return _Cells(parts, source, parents, tables, all_rows, rows)


def _rows_at(parts: list[P.Partition], lat: np.ndarray, lon: np.ndarray,
             known: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """:func:`P.locate` for points most of which are among ``known`` (lat, lon, rows): a point's rows depend on
    its coordinates alone, so those are read by exact coordinates and only the others are located."""
    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    k_lat, k_lon, k_rows = known
    if not len(k_rows):
        return P.locate(parts, lat, lon)
    key = np.asarray(k_lat, np.float64) + 1j * np.asarray(k_lon, np.float64)  # complex: sorted by lat, then lon
    order = np.argsort(key)
    want = lat + 1j * lon
    at = order[np.minimum(np.searchsorted(key[order], want), len(order) - 1)]
    found = key[at] == want
    out = np.empty((len(want), len(parts)), np.int64)
    out[found] = k_rows[at[found]]
    if not found.all():
        out[~found] = P.locate(parts, lat[~found], lon[~found])
    return out


def _scenes(meta: pd.DataFrame, column: str | None) -> tuple[np.ndarray | None, list]:
    """Each photo's scene as an index into the sorted scene labels (-1: none), and those labels; (None, [])
    without a scene column. The labels are stored with the heads, which read a one-hot of the index."""
    if not column:
        return None, []
    if column not in meta.columns:
        raise ValueError(f"--scene-column {column!r}: not a manifest column ({', '.join(meta.columns)})")
    col = meta[column]
    values = sorted({v for v in col.dropna().tolist()}, key=str)
    lookup = {v: i for i, v in enumerate(values)}
    return np.array([lookup.get(v, -1) for v in col.tolist()], dtype=np.int64), values


def _calibrate(result: TrainResult, emb: np.ndarray, cells: _Cells, latlon: tuple[np.ndarray, np.ndarray],
               hc: HeadConfig, groups: np.ndarray | None, scene: np.ndarray | None, n_scenes: int,
               crossfit: bool, regions: bool = True) -> dict:
    """Temperatures and the prior's weight, fitted on logits of photos the scoring heads did not train on.

    Enough held-out photos (or ``crossfit`` off): those of the held-out photographers, a seeded sample of
    ``CALIBRATION_PHOTOS`` above. Fewer: every photo, scored by heads cross-fitted without its fold. With
    ``regions`` (heads that answer users, not fusion's out-of-fold fits), also the regions' conformal map.
    """
    val = result.val_index
    if len(val) >= CALIBRATION_PHOTOS or not crossfit:
        calib_rows, how = val, "the held-out photographers"
        if len(val) > CALIBRATION_PHOTOS:  # the sample calibration would take: logits of only those photos
            calib_rows = val[np.sort(np.random.default_rng(0).choice(len(val), CALIBRATION_PHOTOS, replace=False))]
        logits, _ = head_logits(result.model, emb[calib_rows], scene[calib_rows] if scene is not None else None)
    else:
        calib_rows, how = np.arange(len(emb)), f"{CROSSFIT_FOLDS}-fold cross-fitted heads"
        logits = _crossfit_logits(emb, cells.rows, cells.cell_latlon, latlon, hc, groups, scene, n_scenes)
    priors = log_priors([t["count"].to_numpy(float) for t in cells.tables])
    parent_rows = [cells.parents[cells.parts[-1].name][p.name] for p in cells.parts[:-1]]
    calibration = fit_calibration(logits, cells.rows[calib_rows], priors, parent_rows,
                                  groups[calib_rows] if groups is not None else None)
    calibration["source"] = how
    if not regions:
        return calibration
    # the regions' map: split conformal needs the answering heads themselves, on photographers they did not see
    # scored a block of photos at a time: the logits of all 20,000 at once (and their concatenation) were the
    # cells stage's peak at 150K x 1280 (+0.66 GB); a photo's score does not depend on its block
    region_rows, region_cells = region_rows_of(val), RegionCells(cells.tables, [p.name for p in cells.parts])
    scored = [region_scores(cells, head_logits(result.model, emb[rows], scene[rows] if scene is not None else None)[0],
                            rows, parent_rows, calibration, groups, region_cells)
              for rows in np.array_split(region_rows, max(1, -(-len(region_rows) // REGION_BLOCK)))]
    calibration["region"] = conformal_map(*(np.concatenate(part) for part in zip(*scored)))
    return calibration


def region_rows_of(val: np.ndarray) -> np.ndarray:
    """The held-out photos the regions' map is fitted on: all of them up to :data:`REGION_PHOTOS`, else a seeded
    sample of that many (sorted)."""
    if len(val) <= REGION_PHOTOS:
        return val
    return np.sort(np.random.default_rng(0).choice(val, REGION_PHOTOS, replace=False))


def _region_map(cells: _Cells, logits: list[np.ndarray], calib_rows: np.ndarray, parent_rows: list[np.ndarray],
                calibration: dict, groups: np.ndarray | None) -> dict:
    """The regions' conformal map (:mod:`geo.stages.cells.region`): the held-out photographers' photos
    (``calib_rows``, their ``logits`` from the heads that answer queries) scored by :func:`region_scores`,
    binned by their posterior's top-cell mass."""
    return conformal_map(*region_scores(cells, logits, calib_rows, parent_rows, calibration, groups))


def region_scores(cells: _Cells, logits: list[np.ndarray], calib_rows: np.ndarray, parent_rows: list[np.ndarray],
                  calibration: dict, groups: np.ndarray | None,
                  region_cells: RegionCells | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(conformal score, top-cell mass) of each held-out photo: its calibrated posterior against its true cells.
    ``region_cells``: the partition's, from a caller that scores block after block (made once: 0.45 s at 150K).

    Each photo is scored as a new photographer's would be: its photographer's own gallery photos (``groups``:
    each training photo's photographer; without them, the photo alone) are taken out of the gallery prior's
    counts. A held-out photographer's photos are in the gallery, a new one's are not: with them in, the map
    under-covered 999 new photographers of the 150K testbed at 0.5 (0.474, Mondrian) and with them out did not
    (0.487; benchmarks/RESULTS.md). The partition stays as it is (it is what a query is answered over)."""
    truth = cells.rows[calib_rows]
    region_cells = region_cells or RegionCells(cells.tables, [p.name for p in cells.parts])
    counts = cells.tables[-1]["count"].to_numpy(float)
    own, photographer = _own_counts(cells, calib_rows, groups)
    scores, top = [np.zeros(0)], [np.zeros(0)]
    for s in range(0, len(calib_rows), CHUNK):
        own_rows = own[photographer[s:s + CHUNK]].toarray()
        fine = np.maximum(counts[None, :] - own_rows, 0.0) + 1.0  # log_priors' add-one, per photo
        prior = np.log(fine) - np.log(fine.sum(axis=1, keepdims=True))
        probs = np.exp(fine_log_posterior([z[s:s + CHUNK] for z in logits], [prior], calibration["temperature"],
                                          calibration["alpha"], parent_rows))
        scores.append(region_cells.scores(probs, truth[s:s + CHUNK]))
        top.append(probs.max(axis=1))
    return np.concatenate(scores), np.concatenate(top)


def _own_counts(cells: _Cells, calib_rows: np.ndarray, groups: np.ndarray | None) -> tuple[Any, np.ndarray]:
    """(each calibration photographer's photos per fine cell, sparse [photographers, fine cells]; each calibration
    photo's photographer): counted on the training photos and scaled to the gallery (the heads may train on a
    uniform sample of it), so they are what its cell counts hold of them."""
    from scipy.sparse import csr_matrix

    if groups is None:  # each photo its own photographer
        photographer = np.arange(len(calib_rows))
        by, fine, n = photographer, cells.rows[calib_rows, -1], len(calib_rows)
    else:  # all their training photos, not only those the map is fitted on
        names, photographer = np.unique(groups[calib_rows], return_inverse=True)
        theirs = np.flatnonzero(np.isin(groups, names))
        by, fine, n = np.searchsorted(names, groups[theirs]), cells.rows[theirs, -1], len(names)
    inside = fine >= 0
    scale = len(cells.all_rows) / max(len(cells.rows), 1)
    own = csr_matrix((np.full(int(inside.sum()), scale), (by[inside], fine[inside])),
                     shape=(n, len(cells.tables[-1])))  # duplicates summed
    return own, photographer


def _regression(emb: np.ndarray, lat: np.ndarray, lon: np.ndarray, groups: np.ndarray | None, seed: int,
                log: Callable[[str], None]) -> Regression:
    """The coordinate regression (``--mode regression``), with its out-of-fold error in the build's log."""
    regression = fit_regression(emb, lat, lon, groups, seed)
    if "held_out_median_km" in regression.info:
        log(f"cells: coordinate regression (ridge alpha {regression.info['alpha']:g}, weight "
            f"{regression.info['shrink']['weight']:.1f} against the prior): out-of-fold median "
            f"{regression.info['held_out_median_km']:.0f} km")
    return regression


def _city_head(emb: np.ndarray, lat: np.ndarray, lon: np.ndarray, val: np.ndarray, tau_min: int, hc: HeadConfig,
               groups: np.ndarray | None, log: Callable[[str], None]) -> CityHead | None:
    """The city head (an answer's cities), trained without the held-out photographers, with its held-out
    accuracy against always answering the commonest class in the build's log, and why answers do not use it
    when it does not beat that by a photographer-clustered standard error."""
    city = fit_city_head(emb, lat, lon, val, tau_min, hc, groups)
    if city is not None and "held_out_acc" in city.info:
        log(f"cells: city head over {city.info['cities']} cities + elsewhere: held-out top-1 "
            f"{city.info['held_out_acc']:.1%} (majority class {city.info['majority_acc']:.1%})")
    if city is not None and not city.used:
        log(f"cells: city head not used: {city.info['not_used_because']}")
    return city


def with_photos(pred: CellPredictor, lat: np.ndarray, lon: np.ndarray) -> CellPredictor:
    """The same partitions and heads, with every table's counts and Class2GPS means and the support spots
    recomputed from these photos (all of the gallery's, old and new). What ``geo add`` does to the cells:
    the partitions and the heads are refitted only with ``--refit``."""
    ok = valid_latlon(lat, lon)
    lat, lon = np.asarray(lat, float)[ok], np.asarray(lon, float)[ok]
    located = P.locate(P.partitions_from_tables(pred.tables, pred.names), lat, lon)
    tables, rows = [], None
    for k, t in enumerate(pred.tables):
        rows = located[:, k]
        inside = rows >= 0
        counts = np.bincount(rows[inside], minlength=len(t))
        xyz = latlon_to_xyz(lat[inside], lon[inside])
        mean_lat, mean_lon = xyz_to_latlon(np.stack([np.bincount(rows[inside], weights=xyz[:, a], minlength=len(t))
                                                     for a in range(3)], 1))
        new = t.copy()
        new["count"] = counts.astype(np.int64)
        filled = counts > 0  # a cell still without photos keeps its published (or earlier) mean
        new.loc[filled, "lat"], new.loc[filled, "lon"] = mean_lat[filled], mean_lon[filled]
        tables.append(new)
    support = support_points(lat, lon, rows, tables[-1])
    info = {**pred.info, "photos": int(len(lat)), "support_spots": int(len(support))}
    return CellPredictor(tables, pred.names, pred.model, pred.calibration, pred.scene_values, support, info,
                         pred.scene_column, pred.regression, pred.city_head)


def _crossfit_logits(emb, rows, cell_latlon, photo_latlon, hc: HeadConfig, groups, scene, n_scenes) -> list[np.ndarray]:
    """Head logits for every photo from heads trained without its photographer's fold.

    The one held-out split of a small gallery is a few photographers, too few
    to fit a temperature and a prior weight: on Im2GPS3k dev folds it let the
    heads' confidence through where it did not transfer to new photographers,
    and cost 6 points at 2500 km. Scoring every photo out of fold uses the whole
    gallery; it costs CROSSFIT_FOLDS more trainings, on galleries small enough for that to be seconds.
    """
    if groups is not None and len(np.unique(groups)) < CROSSFIT_FOLDS:
        groups = None
    fold = group_folds(len(emb), groups, CROSSFIT_FOLDS, hc.seed)
    out = [np.zeros((len(emb), len(c[0])), dtype=np.float32) for c in cell_latlon]
    for f in range(CROSSFIT_FOLDS):
        held, fit = fold == f, fold != f
        if not held.any():
            continue
        part = train_heads(emb[fit], rows[fit], cell_latlon, (photo_latlon[0][fit], photo_latlon[1][fit]), hc,
                           groups=groups[fit] if groups is not None else None,
                           scene=scene[fit] if scene is not None else None, n_scenes=n_scenes)
        logits, _ = head_logits(part.model, emb[held], scene[held] if scene is not None else None)
        for o, z in zip(out, logits):
            o[held] = z
    return out
