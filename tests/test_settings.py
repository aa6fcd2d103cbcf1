"""A bundle remembers how it was built: `geo add --refit`, `--force STAGE` and `geo info` use its settings."""
from __future__ import annotations

import json

import numpy as np
import pytest
from synthetic import synthetic_gallery, write_embeddings
from typer.testing import CliRunner

from geo.cli import app
from geo.query.index import open_index
from geo.settings import BuildSettings, SettingsError, from_dict, layered, read_config, recorded, to_dict
from geo.store.atomic import atomic_write_json
from geo.store.bundle import open_bundle


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def settings_of(root) -> dict:
    return recorded(open_bundle(root).manifest)


# Small, non-default values for the stages the options do not name: they come from --config.
TUNED = {"cells": {"tau_min": 3, "tau_max": [40, 12], "max_epochs": 12}, "gallery": {"epochs": 1, "max_points": 60},
         "embed": {"shard_rows": 40}, "train_photos": 140}


def test_refit_keeps_every_setting_and_answers_as_a_fresh_build(tmp_path):
    df = synthetic_gallery(150)
    first = write_embeddings(df.head(100), tmp_path / "first.parquet")
    rest = write_embeddings(df.iloc[100:], tmp_path / "rest.parquet")
    everything = write_embeddings(df, tmp_path / "all.parquet")
    config = tmp_path / "tuned.json"
    config.write_text(json.dumps(TUNED))
    options = ("--backbone", "toy24", "--head", "mlp", "--partitioner", "bottomup", "--skip", "fusion",
               "--group", "AUTHOR", "--config", config, "-q")
    grown, fresh = tmp_path / "grown", tmp_path / "fresh"
    assert invoke("build-index", "--embeddings", first, "--out", grown, *options).exit_code == 0
    built = settings_of(grown)
    r = invoke("add", grown, "--embeddings", rest, "--refit", "-q")
    assert r.exit_code == 0, r.output
    assert invoke("build-index", "--embeddings", everything, "--out", fresh, *options).exit_code == 0

    s = settings_of(grown)
    assert s == built == settings_of(fresh)
    assert (s["cells"]["head"], s["cells"]["partitioner"], s["cells"]["tau_min"], s["cells"]["tau_max"],
            s["cells"]["max_epochs"]) == ("mlp", "bottomup", 3, [40, 12], 12)
    assert (s["skip"], s["group_column"], s["train_photos"]) == (["fusion"], "AUTHOR", 140)
    assert (s["gallery"]["epochs"], s["gallery"]["max_points"], s["embed"]["shard_rows"]) == (1, 60, 40)
    a, b = open_index(grown), open_index(fresh)
    assert not a.bundle.has_stage("fusion") and a.bundle.stage("cells")["photos"] == 150
    assert a.bundle.stage("cells")["tau_min"] == 3 and a.bundle.stage("cells")["source"] == "bottomup"
    assert "stale" not in a.bundle.manifest
    q = np.stack(df["embedding"].iloc[::5]).astype(np.float32)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    for mode in ("knn", "cells", "gallery"):
        x, y = a.locate_embeddings(q, mode=mode), b.locate_embeddings(q, mode=mode)
        assert [(p.lat, p.lon) for p in x] == [(p.lat, p.lon) for p in y], mode

    r = invoke("info", grown)
    assert r.exit_code == 0 and "cells.head mlp" in r.output and "skip fusion" in r.output
    r = invoke("info", grown, "--json")
    assert json.loads(r.output)["build"]["settings"] == s


def test_an_explicit_option_overrides_the_record_on_force(tmp_path):
    emb = write_embeddings(synthetic_gallery(120), tmp_path / "emb.parquet")
    out = tmp_path / "b"
    base = ("build-index", "--embeddings", emb, "--backbone", "toy24", "--out", out, "-q")
    assert invoke(*base, "--head", "mlp", "--partitioner", "bottomup", "--skip", "gallery", "--skip", "fusion"
                  ).exit_code == 0
    r = invoke(*base, "--head", "linear")  # would record a head the built cells do not have
    assert r.exit_code == 2 and "cells.head 'mlp' -> 'linear' (cells)" in r.output and "--force" in r.output
    assert invoke(*base, "--force", "cells", "--head", "linear").exit_code == 0
    s = settings_of(out)
    # the option given wins; what it does not name (partitioner, the skipped stages) is the record's
    assert (s["cells"]["head"], s["cells"]["partitioner"], s["skip"]) == ("linear", "bottomup", ["gallery", "fusion"])
    assert not open_bundle(out).has_stage("fusion")
    assert invoke(*base, "--force", "fusion").exit_code == 0  # --force un-skips a recorded skip
    assert open_bundle(out).has_stage("fusion") and settings_of(out)["skip"] == ["gallery"]


def test_a_bundle_without_recorded_settings_loads_and_refits_with_defaults(tmp_path):
    df = synthetic_gallery(130)
    first = write_embeddings(df.head(90), tmp_path / "first.parquet")
    rest = write_embeddings(df.iloc[90:], tmp_path / "rest.parquet")
    out = tmp_path / "old"
    config = tmp_path / "c.toml"
    config.write_text("[gallery]\nepochs = 1\n")
    # recorded, the skip would hold on a refit; with the record gone, the refit takes the defaults: fusion too
    assert invoke("build-index", "--embeddings", first, "--backbone", "toy24", "--out", out, "--skip", "fusion",
                  "--config", config, "-q").exit_code == 0
    bundle = open_bundle(out)
    del bundle.manifest["build"]["settings"]  # as geo wrote bundles before it recorded them
    bundle.save()
    r = invoke("info", out)
    assert r.exit_code == 0 and "settings: not recorded" in r.output
    assert invoke("add", out, "--embeddings", rest, "--refit", "-q").exit_code == 0
    index = open_index(out)
    assert index.bundle.stage("cells")["photos"] == 130 and index.bundle.has_stage("fusion")


def test_config_files_are_checked_and_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[cells]\nhed = 'mlp'\n")
    emb = write_embeddings(synthetic_gallery(60), tmp_path / "emb.parquet")
    r = invoke("build-index", "--embeddings", emb, "--backbone", "toy24", "--out", tmp_path / "b", "--config", bad)
    assert r.exit_code == 2 and "bad.toml" in r.output and "'cells.hed'" in r.output
    assert not (tmp_path / "b").exists()
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"gallery": {"epochs": "many"}}))
    with pytest.raises(SettingsError, match=r"wrong.json: gallery.epochs must be int"):
        read_config(wrong)
    wrong.write_text(json.dumps({"skip": ["knn_index"]}))
    with pytest.raises(SettingsError, match="skip takes cells, gallery, fusion"):
        read_config(wrong)


def test_the_json_form_round_trips_and_tolerates_other_versions():
    s = from_dict({"cells": {"head": "mlp", "tau_max": [9, 3]}, "gallery": {"sigmas": [1, 16]}, "skip": ["fusion"]})
    assert from_dict(to_dict(s)) == s and s.stages.gallery.sigmas == (1.0, 16.0)
    d = to_dict(s)
    assert "device" not in d["cells"] and "workers" not in d["embed"] and "precision" not in d  # machine-specific
    old = {**d, "retired_option": 1, "cells": {**d["cells"], "gone": True, "head": 3}}
    assert from_dict(old).stages.cells.head == "linear"  # unknown keys ignored, an ill-typed value defaulted
    assert from_dict({}) == BuildSettings()
    # precedence: defaults < record < config < explicit options
    got = layered({"cells": {"head": "mlp", "partitioner": "bottomup"}, "skip": ["fusion"]},
                  {"cells": {"partitioner": "semantic"}, "gallery": {"device": "cpu"}}, {"skip": []})
    assert (got.stages.cells.head, got.stages.cells.partitioner, got.skip, got.stages.gallery.device) == \
        ("mlp", "semantic", (), "cpu")


def test_a_record_from_geo_info_json_is_a_config(tmp_path):
    info = {"format_version": 1, "build": {"stages": [], "settings": {"cells": {"head": "mlp"}}}}
    path = tmp_path / "info.json"
    atomic_write_json(path, info)
    assert read_config(path) == {"cells": {"head": "mlp"}}
