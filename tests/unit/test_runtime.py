"""FERRY_GC_THRESHOLD: parsed strictly, applied by every service process at start."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from ferry_common.runtime import GC_THRESHOLD, gc_threshold, tune_gc


@pytest.fixture(autouse=True)
def _keep_thresholds() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


def test_the_default_is_ferrys_and_default_means_pythons() -> None:
    assert gc_threshold(None) == gc_threshold("") == GC_THRESHOLD
    assert gc_threshold("default") is None
    assert gc_threshold("1000, 5, 5") == (1000, 5, 5)


@pytest.mark.parametrize("bad", ["100", "a,b,c", "0,10,10", "1,2,3,4", "-5,10,10"])
def test_a_bad_setting_is_refused_with_the_expected_form(bad: str) -> None:
    with pytest.raises(ValueError, match="FERRY_GC_THRESHOLD=.*e.g. 20000,20,50"):
        gc_threshold(bad)


def test_tune_gc_applies_the_setting() -> None:
    gc.set_threshold(700, 10, 10)
    assert tune_gc({}) == GC_THRESHOLD == gc.get_threshold()
    assert tune_gc({"FERRY_GC_THRESHOLD": "5000,10,20"}) == (5000, 10, 20)
    gc.set_threshold(700, 10, 10)
    assert tune_gc({"FERRY_GC_THRESHOLD": "default"}) == (700, 10, 10)
