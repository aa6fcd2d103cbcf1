"""Shared fixtures and the suite's fast/slow split. Keep small: images are generated, never downloaded or vendored.

``python -m pytest`` (a developer's default, pyproject's addopts) runs the fast part, about two minutes on a quiet
2-core machine; ``python -m pytest -m slow`` the rest; ``bash scripts/test.sh`` (CI) runs both.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from geo.cli import app
from synthetic import textured as _textured

# The slow part: whole builds with training, fine-tuning, Ray, a browser, kill-and-resume, 30-s soaks. Chosen from
# `python -m pytest -m "slow or not slow" --durations=0` (the rest shares one session bundle, `cli_bundle`).
SLOW_MODULES = {
    "test_add.py", "test_cells_semantic.py", "test_city_head.py", "test_cluster.py", "test_concurrency.py",
    "test_embeddings_in.py", "test_export.py", "test_finetune.py", "test_kill_resume.py", "test_large_gallery.py", "test_leaks.py",
    "test_progress.py", "test_serve_browser.py", "test_small_galleries.py",
}
SLOW_TESTS = {
    "test_a_stray_shard_is_never_read_and_geo_info_names_it", "test_each_module_imports_first_and_alone",
    "test_the_whole_package_imports_in_any_order", "test_reproduces_geoestimation_footer_exactly",
    "test_scene_conditioned_heads_use_the_scene", "test_stage_writes_registers_and_predicts", "test_build_and_search",
    "test_a_cold_query_imports_neither_timm_nor_pandas",
}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in SLOW_MODULES or getattr(item, "originalname", item.name) in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def make_image(tmp_path):
    """make_image(name, width=320, height=240, seed=0, **save_kwargs) -> path of a saved textured image."""

    def make(name: str, width: int = 320, height: int = 240, seed: int = 0, **save_kwargs) -> str:
        path = tmp_path / name
        _textured(width, height, seed).save(path, **save_kwargs)
        return str(path)

    return make


@pytest.fixture
def textured():
    """textured(width, height, seed=0) -> a photo-like RGB PIL image."""
    return _textured


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "osv5m"
FAST_BUILD = Path(__file__).resolve().parent / "fast_build.json"  # small shards and batches, two gallery epochs


@pytest.fixture(scope="session")
def cli_bundle(tmp_path_factory) -> tuple[Path, Path]:
    """(manifest, bundle) of the 66 vendored gallery photos built with `geo build-index`: every stage runs.

    Nine "photographers" (an ``owner`` column) let fusion hold out whole groups. Built once per session:
    it is the slowest fixture, and the CLI, fusion and query tests all read it.
    """
    df = pd.read_csv(EXAMPLES / "gallery.csv", dtype={"id": str})
    df["path"] = [str(EXAMPLES / p) for p in df["path"]]
    df["owner"] = [f"o{i % 9}" for i in range(len(df))]
    manifest = tmp_path_factory.mktemp("m") / "gallery.csv"
    df.to_csv(manifest, index=False)
    out = tmp_path_factory.mktemp("idx") / "bundle"
    r = CliRunner().invoke(app, ["build-index", str(manifest), "--out", str(out), "--workers", "0", "--config",
                                 str(FAST_BUILD), "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "66 photos indexed, 0 failed" in r.output
    return manifest, out
