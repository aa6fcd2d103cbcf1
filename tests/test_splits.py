"""The shared validation split and the statistics over it: whole photographers on one side, reproducible."""
import numpy as np
import pytest

from geo.core.splits import clustered_se, group_column, validation_mask


def test_groups_stay_whole_and_split_is_seeded():
    rng = np.random.default_rng(0)
    groups = rng.choice([f"a{i}" for i in range(40)], size=1000)
    va = validation_mask(len(groups), groups, 0.2, seed=3)
    assert set(groups[va]).isdisjoint(groups[~va])
    assert 0.1 <= va.mean() <= 0.4
    assert (validation_mask(len(groups), groups, 0.2, seed=3) == va).all()
    assert (validation_mask(len(groups), groups, 0.2, seed=4) != va).any()


def test_without_groups_rows_are_drawn_and_never_all_groups_held_out():
    assert validation_mask(100, None, 0.25, seed=0).sum() == 25
    two = np.array(["a"] * 5 + ["b"] * 5)
    va = validation_mask(10, two, 0.9, seed=0)
    assert va.any() and not va.all()


def test_group_column_detection():
    assert group_column(["IMG_ID", "AUTHOR", "LAT"]) == "AUTHOR"
    assert group_column(["id", "lat"]) is None
    try:
        group_column(["id"], "owner")
    except ValueError as e:
        assert "owner" in str(e)
    else:
        raise AssertionError("unknown group column accepted")


def test_clustered_standard_error_sees_photographers_move_together():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(8), 50)             # 8 photographers, 50 photos each
    d = np.repeat(rng.choice([-1.0, 1.0], 8), 50)   # each photographer's photos all gain or all lose
    assert clustered_se(d, groups) > 5 * clustered_se(d)   # independent-photo SE understates the noise
    independent = rng.choice([-1.0, 1.0], 400)
    assert clustered_se(independent, np.arange(400)) == pytest.approx(clustered_se(independent), rel=0.01)


def test_clustered_se_is_the_textbook_sandwich_over_photographers_in_any_order():
    """sqrt(G / (G - 1) * sum over photographers of (their summed deviation)^2) / n, photos in any order (the
    sums run over the photos sorted by photographer, never a dense [photos, photographers] one-hot)."""
    rng = np.random.default_rng(5)
    d, groups = rng.normal(size=500), rng.choice([f"p{i}" for i in range(60)], 500)
    dev = d - d.mean()
    sums = [dev[groups == g].sum() for g in np.unique(groups)]
    want = np.sqrt(60 / 59 * np.sum(np.square(sums))) / 500
    assert clustered_se(d, groups) == pytest.approx(want, rel=1e-12)
    perm = rng.permutation(500)
    assert clustered_se(d[perm], groups[perm]) == pytest.approx(want, rel=1e-12)
