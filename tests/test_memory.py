"""geo.core.memory: what a build asks of the C allocator between stages (the effect itself, 6.57 -> 3.03 GB
peak at 150K x 1280, is measured by benchmarks/bench_build_memory.py, not here)."""
from __future__ import annotations

import sys

import numpy as np

from geo.core import memory


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


BUILD = [("mallopt", -3, 1 << 20), ("mallopt", -1, 128 << 10)]
FEATURE_MAPS = [("mallopt", -3, 512 << 20), ("mallopt", -1, 512 << 20)]


def fake_libc(monkeypatch) -> FakeLibc:
    libc = FakeLibc()
    monkeypatch.setattr(memory, "_libc", lambda: libc)
    monkeypatch.setattr(memory, "_policy", None)  # a fresh process; restored after the test
    for name in memory.MALLOC_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    return libc


def test_a_build_pins_the_mmap_threshold_and_trims_after_a_stage(monkeypatch):
    libc = fake_libc(monkeypatch)
    memory.map_large_blocks()
    memory.release_unused()
    assert libc.calls == [*BUILD, ("malloc_trim", 0)]


def test_a_process_that_only_answers_keeps_feature_maps_from_its_first_forward_pass(monkeypatch):
    libc = fake_libc(monkeypatch)
    memory.keep_feature_maps()
    memory.keep_feature_maps()  # once
    with memory.feature_maps_kept():  # outside a build: nothing to switch back to
        pass
    assert libc.calls == FEATURE_MAPS


def test_a_build_keeps_feature_maps_in_its_embedding_stage_alone(monkeypatch):
    libc = fake_libc(monkeypatch)
    memory.map_large_blocks()
    memory.keep_feature_maps()  # a forward pass inside the build: the build's policy stands
    assert libc.calls == BUILD
    with memory.feature_maps_kept():
        assert libc.calls == BUILD + FEATURE_MAPS
    assert libc.calls == BUILD + FEATURE_MAPS + BUILD + [("malloc_trim", 0)]


def test_malloc_tuned_through_the_environment_is_left_alone(monkeypatch):
    libc = fake_libc(monkeypatch)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    memory.keep_feature_maps()
    memory._policy = "build"
    with memory.feature_maps_kept():
        pass
    assert libc.calls == []


def test_without_glibc_nothing_is_asked_and_nothing_fails(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert memory._libc() is None
    memory.map_large_blocks()
    memory.release_unused()


def test_the_real_allocator_keeps_arrays_intact_across_a_release():
    memory.map_large_blocks()
    a = np.arange(1 << 20, dtype=np.float64)
    memory.release_unused()
    assert a.sum() == (1 << 20) * ((1 << 20) - 1) / 2


def test_compact_rows_keeps_a_float16_sample_and_makes_anything_else_float32():
    half = np.ones((4, 3), np.float16)[:, ::-1]  # a strided view: made contiguous, not widened
    out = memory.compact_rows(half)
    assert out.dtype == np.float16 and out.flags.c_contiguous
    assert memory.compact_rows(np.ones((4, 3))).dtype == np.float32
    same = np.ones((4, 3), np.float32)
    assert memory.compact_rows(same) is same


class Node:
    """An object in a reference cycle: only the garbage collector frees it."""

    def __init__(self):
        self.me = self


def test_a_block_collects_only_its_own_garbage_and_what_it_froze_is_collected_after():
    import gc
    import weakref

    before = Node()
    old = weakref.ref(before)
    with memory.own_garbage_only():
        assert gc.get_freeze_count() > 0
        made = Node()
        new = weakref.ref(made)
        del before, made
        memory.release_unused()
        assert new() is None  # garbage the block made is collected inside it
        assert old() is not None  # what was alive when it began is left alone until it ends
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert old() is None  # and then collected, not lost


def test_nested_blocks_share_one_freeze_and_an_error_still_lifts_it():
    import gc

    try:
        with memory.own_garbage_only():
            with memory.own_garbage_only():
                pass
            assert gc.get_freeze_count() > 0  # the inner block's end leaves the outer one's freeze
            raise RuntimeError("a failed build")
    except RuntimeError:
        pass
    assert gc.get_freeze_count() == 0
