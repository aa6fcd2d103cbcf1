"""Published results, printed beside a suite's scores so a user sees where their index stands.

Only numbers traceable to a paper (or, for GeoEstimation, to the authors'
released per-image result files) are listed. Accuracies are percentages at
1 / 25 / 200 / 750 / 2500 km, exactly as printed in the source; the papers
differ in distance (haversine vs geodesic) and training data, so read the
table as a landmark, not a leaderboard.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from geo.eval.metrics import THRESHOLDS_KM


@dataclass(frozen=True)
class Published:
    method: str
    suite: str
    acc_pct: tuple[float, float, float, float, float]
    source: str
    note: str = ""


_GEOCLIP = "Vivanco Cepeda et al., GeoCLIP, NeurIPS 2023, Table 1"
_PIGEOTTO = "Haas et al., PIGEON (PIGEOTTO model), CVPR 2024"
_G3 = "Jia et al., G3, NeurIPS 2024, Table 1"
_ISNS = "Müller-Budack et al., GeoEstimation, ECCV 2018 (footer of the released results/{suite}/ISNs_M-fstar-S3.csv)"

PUBLISHED: tuple[Published, ...] = (
    Published("GeoEstimation ISNs (M, f*, S3)", "im2gps", (16.88, 43.04, 51.90, 66.67, 80.17), _ISNS.format(suite="im2gps"),
              "mean error 1732.86 km"),
    Published("GeoEstimation ISNs (M, f*, S3)", "im2gps3k", (10.54, 27.99, 36.64, 49.68, 65.97),
              _ISNS.format(suite="im2gps3k"), "mean error 3223.12 km"),
    Published("GeoCLIP", "im2gps3k", (14.11, 34.47, 50.65, 69.67, 83.82), _GEOCLIP),
    Published("GeoCLIP", "yfcc4k", (9.59, 19.31, 32.63, 55.0, 74.69), _GEOCLIP),
    Published("PIGEOTTO", "im2gps3k", (11.3, 36.7, 53.8, 72.4, 85.3), _PIGEOTTO),
    Published("PIGEOTTO", "yfcc4k", (10.4, 23.7, 40.6, 62.2, 77.7), _PIGEOTTO),
    Published("G3", "im2gps3k", (16.65, 40.94, 55.56, 71.24, 84.68), _G3),
    Published("G3", "yfcc4k", (23.99, 35.89, 46.98, 64.26, 78.15), _G3),
)


def published_for(suite: str) -> list[Published]:
    return [p for p in PUBLISHED if p.suite == suite]


def published_json(suite: str) -> list[dict[str, Any]]:
    return [
        {"method": p.method, "acc_pct": dict(zip(map(str, THRESHOLDS_KM), p.acc_pct)), "source": p.source, "note": p.note}
        for p in published_for(suite)
    ]


def comparison_table(suite: str, ours: Mapping[str, Any] | None = None, label: str = "this index",
                     more: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """A plain-text table: our accuracies (if given; ``more`` adds rows by label, e.g. one per mode) above the
    published rows for ``suite`` ("" if none)."""
    rows = published_for(suite)
    if not rows:
        return ""
    head = f"{'method':<34}" + "".join(f"{str(t) + ' km':>9}" for t in THRESHOLDS_KM) + "  source"
    lines = [head, "-" * len(head)]
    for name, summary in ([(label, ours)] if ours is not None else []) + list((more or {}).items()):
        pct = ["   -" if math.isnan(summary["acc"][str(t)]) else f"{100 * summary['acc'][str(t)]:.2f}"
               for t in THRESHOLDS_KM]
        lines.append(f"{name:<34}" + "".join(f"{v:>9}" for v in pct) + f"  n={summary['n']}")
    for p in rows:
        lines.append(f"{p.method:<34}" + "".join(f"{v:>9.2f}" for v in p.acc_pct) + f"  {p.source}")
    return "\n".join(lines)
