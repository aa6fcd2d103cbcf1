"""Scoring region answers: does the truth lie inside, and how large are the regions, per stated coverage.

``geo bench`` marks each prediction row (:func:`mark_regions`: ``region_hit`` and a ``hit`` in every entry of
``region_curve``) with the index's cells, which locate the truth in every partition exactly; ``geo bench`` and
``geo report`` then print :func:`region_table`, the recall-vs-area table.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd


def mark_regions(index: Any, preds: pd.DataFrame) -> None:
    """Fill ``region_hit`` and the curve's ``hit`` of every row with a region and a truth, in place. An index
    without cells (or a test's fake) marks nothing."""
    cells = getattr(index, "cells", None)
    todo = preds["region"].notna().to_numpy() & preds["true_lat"].notna().to_numpy() & preds["true_lon"].notna().to_numpy()
    if cells is None or not todo.any():
        return
    rc = cells.region_cells
    lat, lon = preds.loc[todo, "true_lat"].to_numpy(float), preds.loc[todo, "true_lon"].to_numpy(float)
    hit = np.full(len(preds), None, dtype=object)
    hit[todo] = rc.contains([json.loads(r)["cells"] for r in preds.loc[todo, "region"]], lat, lon)
    preds["region_hit"] = hit
    curves = [json.loads(c) if isinstance(c, str) else [] for c in preds.loc[todo, "region_curve"]]
    for level in range(max((len(c) for c in curves), default=0)):
        inside = rc.contains([c[level]["cells"] if level < len(c) else [] for c in curves], lat, lon)
        for c, h in zip(curves, inside):
            if level < len(c):
                c[level]["hit"] = bool(h)
    preds.loc[todo, "region_curve"] = [json.dumps(c) for c in curves]


def region_table(preds: pd.DataFrame) -> list[dict[str, Any]]:
    """Per stated coverage (the curve's levels, and the rows' own coverage): photos scored, the share whose
    truth lies inside, the median and mean area (km²). Rows of several modes share one region (it comes from
    the cells stage), so each query counts once."""
    rows = preds.drop_duplicates("query_id")
    scored: dict[float, list[tuple[bool, float]]] = {}
    for curve in rows["region_curve"].dropna():
        for level in json.loads(curve):
            if "hit" in level:
                scored.setdefault(float(level["coverage"]), []).append((level["hit"], level["area_km2"]))
    own = rows[rows["region_hit"].notna()]
    for cov, group in own.groupby("region_coverage"):
        if float(cov) not in scored:
            scored[float(cov)] = list(zip(group["region_hit"].astype(bool), group["region_area_km2"]))
    out = []
    for cov in sorted(scored):
        hits, areas = np.array([h for h, _ in scored[cov]], bool), np.array([a for _, a in scored[cov]], float)
        out.append({"coverage": cov, "photos": int(len(hits)), "observed": float(hits.mean()),
                    "median_area_km2": float(np.median(areas)), "mean_area_km2": float(areas.mean())})
    return out


def format_region_table(table: list[dict[str, Any]]) -> str:
    """The table as lines for people."""
    lines = ["region: stated coverage -> observed (truth inside), median area"]
    lines += [f"  {r['coverage']:.2f} -> {r['observed']:.3f} of {r['photos']:,} photos, median "
              f"{r['median_area_km2']:,.0f} km²" for r in table]
    return "\n".join(lines)
