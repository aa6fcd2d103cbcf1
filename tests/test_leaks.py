"""The leakage guard: `geo bench` names queries that are not new to the gallery and scores with and without them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from typer.testing import CliRunner

from geo.cli import app
from geo.eval.leaks import find_leaks
from geo.store.predictions import read_predictions

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "osv5m"


def _topk(similarity: float) -> str:
    return json.dumps([{"id": "g", "similarity": similarity}])


def test_each_kind_of_leak_is_named_and_the_strongest_wins():
    preds = pd.DataFrame({
        "query_id": ["g1", "q2", "q3", "q4", "q5", "q6"],
        "path": ["/x/a.jpg", "/gallery/./b.jpg", "/x/c.jpg", "/x/d.jpg", "/x/e.jpg", "/x/f.jpg"],
        "topk": [_topk(0.5), _topk(0.3), _topk(0.995), _topk(0.4), _topk(0.93), None],
    })
    reason = find_leaks(preds, np.array(["g1", "g2"]), np.array(["/gallery/b.jpg", "/gallery/z.jpg"]),
                        pd.Series(["ann", None, "bob", "ann", "cid", "ann"]), np.array(["ann", "dan", None]))
    assert reason.tolist() == ["same id", "same file", "near-duplicate", "same photographer", None,
                               "same photographer"]
    no_groups = find_leaks(preds, np.array(["g1"]))
    assert no_groups.tolist() == ["same id", None, "near-duplicate", None, None, None]


def test_bench_warns_reports_both_numbers_and_can_exclude(cli_bundle, tmp_path):
    manifest, bundle = cli_bundle
    gallery = pd.read_csv(manifest, dtype={"id": str})
    copy = tmp_path / "copy.jpg"  # a gallery photo resized and re-encoded under a new name and id
    with Image.open(gallery["path"][2]) as im:
        im.resize((im.width * 3 // 4, im.height * 3 // 4)).save(copy, quality=85)
    queries = sorted((EXAMPLES / "queries").glob("*.jpg"))
    truth = pd.read_csv(EXAMPLES / "queries.csv", dtype={"id": str}).set_index("id")
    rows = [
        (gallery["id"][0], gallery["path"][0], gallery["latitude"][0], gallery["longitude"][0], "new1"),
        (gallery["id"][1], gallery["path"][1], gallery["latitude"][1], gallery["longitude"][1], "new2"),
        ("copy", str(copy), gallery["latitude"][2], gallery["longitude"][2], "new3"),
        (queries[0].stem, str(queries[0]), truth.loc[queries[0].stem, "latitude"],
         truth.loc[queries[0].stem, "longitude"], "o3"),  # a gallery photographer
        (queries[1].stem, str(queries[1]), truth.loc[queries[1].stem, "latitude"],
         truth.loc[queries[1].stem, "longitude"], "nobody"),
    ]
    meta = tmp_path / "q.csv"
    pd.DataFrame(rows, columns=["id", "path", "latitude", "longitude", "owner"]).to_csv(meta, index=False)
    out = tmp_path / "p.parquet"
    base = ["bench", "custom", "--index", str(bundle), "--images", "/", "--meta", str(meta), "--no-ci",
            "--quiet"]
    r = CliRunner().invoke(app, [*base, "--json", "--out", str(out)])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["leaks"]["by_reason"] == {"same id": 2, "near-duplicate": 1, "same photographer": 1}
    assert s["n"] == 5 and s["leaks"]["without"]["n"] == 1
    stored = [x if isinstance(x, str) else None for x in read_predictions(out)["leak"]]
    assert stored == ["same id", "same id", "near-duplicate", "same photographer", None]
    human = CliRunner().invoke(app, base)
    assert "warning: leakage: 4 queries are not new to this gallery" in human.output
    assert "without them (n=1)" in human.output
    excluded = json.loads(CliRunner().invoke(app, [*base, "--json", "--exclude-leaks"]).stdout)
    assert excluded["n"] == 1 and excluded["leaks"]["excluded"] and excluded["leaks"]["n"] == 4


def test_a_leaked_score_beside_published_ones_is_marked():
    from geo.cli.bench import _human
    from geo.eval.runner import BenchResult
    from geo.store.predictions import answers_to_frame

    answers = [{"image": f"{i}.jpg", "lat": 10.0 + i, "lon": 20.0, "mode": "knn", "error": None} for i in range(4)]
    preds = answers_to_frame(answers, [str(i) for i in range(4)], [(10.0 + i, 20.0) for i in range(4)])
    preds["leak"] = ["same id", None, None, None]
    result = BenchResult("im2gps3k", Path("meta.csv"), preds)
    text = _human(result.summary(ci=False), "im2gps3k", "this index")
    assert "this index (1 leaked)" in text and "GeoCLIP" in text and "without them (n=3)" in text
    text = _human(result.summary(ci=False, exclude_leaks=True), "im2gps3k", "this index")
    assert "this index (leaks excluded)" in text and "n=3" in text


def test_bench_mode_all_embeds_once_and_agrees_with_single_mode_runs(cli_bundle, tmp_path, monkeypatch):
    from geo.query.index import GeoIndex

    _, bundle = cli_bundle
    queries = sorted((EXAMPLES / "queries").glob("*.jpg"))[:4]
    truth = pd.read_csv(EXAMPLES / "queries.csv", dtype={"id": str}).set_index("id")
    meta = tmp_path / "q.csv"
    pd.DataFrame([(q.stem, str(q), truth.loc[q.stem, "latitude"], truth.loc[q.stem, "longitude"]) for q in queries],
                 columns=["id", "path", "latitude", "longitude"]).to_csv(meta, index=False)
    embedded = []
    real_embed = GeoIndex.embed
    monkeypatch.setattr(GeoIndex, "embed", lambda self, images, **kw: embedded.extend(images) or real_embed(self, images, **kw))
    base = ["bench", "custom", "--index", str(bundle), "--images", "/", "--meta", str(meta), "--no-ci", "--quiet",
            "--json"]
    every = json.loads(CliRunner().invoke(app, [*base, "--mode", "all", "--out", str(tmp_path / "all.parquet")]).stdout)
    assert sorted(embedded) == sorted(map(str, queries))  # four photos, four embeddings, five modes
    assert list(every["modes"]) == ["fused", "knn", "gallery", "cells", "regression"]
    stored = read_predictions(tmp_path / "all.parquet")
    assert len(stored) == 20 and stored.groupby("mode").size().tolist() == [4] * 5
    for mode in ("knn", "cells"):
        alone = json.loads(CliRunner().invoke(app, [*base, "--mode", mode]).stdout)
        assert alone["acc"] == every["modes"][mode]["acc"] and alone["median_km"] == every["modes"][mode]["median_km"]


def test_a_clean_split_says_0_leaks_and_which_checks_found_none(cli_bundle, tmp_path):
    _, bundle = cli_bundle
    queries = sorted((EXAMPLES / "queries").glob("*.jpg"))[:3]
    truth = pd.read_csv(EXAMPLES / "queries.csv", dtype={"id": str}).set_index("id")
    meta = tmp_path / "q.csv"
    pd.DataFrame([(q.stem, str(q), truth.loc[q.stem, "latitude"], truth.loc[q.stem, "longitude"], "nobody")
                  for q in queries], columns=["id", "path", "latitude", "longitude", "owner"]).to_csv(meta, index=False)
    base = ["bench", "custom", "--index", str(bundle), "--images", "/", "--meta", str(meta), "--no-ci", "--quiet"]
    for extra in ([], ["--mode", "all"]):
        r = CliRunner().invoke(app, [*base, *extra])
        assert r.exit_code == 0, r.output
        assert ("leakage: 0 leaks: none of the 3 queries is in or near this gallery (checked: same id, same file, "
                "near-duplicate, same photographer)") in r.output
    s = json.loads(CliRunner().invoke(app, [*base, "--json"]).stdout)
    assert s["leaks"]["n"] == 0 and s["leaks"]["checked"] == ["same id", "same file", "near-duplicate",
                                                               "same photographer"]
