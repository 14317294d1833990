"""The worker's garbage-collector settings while it serves, and that they are undone after."""

from __future__ import annotations

import gc

import pytest

from streamer.serving.worker import GC_GEN0_THRESHOLD, gc_tuned_for_serving


def test_serving_freezes_the_start_up_heap_and_raises_the_young_threshold() -> None:
    before = gc.get_threshold()
    with gc_tuned_for_serving():
        assert gc.get_freeze_count() > 1000  # this test process: pytest, numpy, ...
        assert gc.get_threshold() == (max(before[0], GC_GEN0_THRESHOLD), *before[1:])
        assert gc.isenabled()


def test_gc_settings_are_restored_even_when_serving_fails() -> None:
    before = gc.get_threshold()
    with pytest.raises(RuntimeError, match="boom"), gc_tuned_for_serving():
        raise RuntimeError("boom")
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
