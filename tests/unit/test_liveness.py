"""Host liveness on a fake clock: the bound, recovery, wait_not_ready, the sweep."""

from __future__ import annotations

import asyncio

import pytest

from ferry_common.clock import FakeClock
from ferry_coordinator.fleet.liveness import LivenessTracker


def tracker(clock: FakeClock, changes: list[tuple[str, bool]] | None = None) -> LivenessTracker:
    t = LivenessTracker(clock, default_period_s=1.0, missed=3)
    if changes is not None:
        t.subscribe(lambda h, r: changes.append((h, r)))
    return t


async def test_not_ready_after_three_missed_periods() -> None:
    clock = FakeClock()
    changes: list[tuple[str, bool]] = []
    t = tracker(clock, changes)
    t.beat("a")
    assert t.ready("a") and t.bound_s("a") == 3.0
    await clock.advance(2.9)
    assert t.ready("a")
    await clock.advance(0.1)
    assert not t.ready("a")
    assert changes == [("a", True), ("a", False)]
    t.beat("a")  # back
    assert t.ready("a") and changes[-1] == ("a", True)


async def test_heartbeats_keep_a_host_ready() -> None:
    clock = FakeClock()
    t = tracker(clock)
    t.beat("a")
    for _ in range(10):
        await clock.advance(2.5)
        t.beat("a")
    assert t.ready("a")


async def test_the_host_s_own_period_sets_its_bound() -> None:
    clock = FakeClock()
    t = tracker(clock)
    t.beat("slow", period_s=5.0)
    t.beat("fast")
    await clock.advance(4.0)
    assert t.states() == {"slow": True, "fast": False}
    assert t.bound_s("slow") == 15.0
    await clock.advance(11.0)
    assert t.states() == {"slow": False, "fast": False}


async def test_an_unknown_host_is_not_ready() -> None:
    t = tracker(FakeClock())
    assert not t.ready("ghost")
    await asyncio.wait_for(t.wait_not_ready("ghost"), 1)


async def test_wait_not_ready_returns_at_the_bound_and_not_before() -> None:
    clock = FakeClock()
    t = tracker(clock)
    t.beat("a")
    waiter = asyncio.create_task(t.wait_not_ready("a"))
    await clock.advance(2.0)
    t.beat("a")  # the deadline moves to 5.0
    await clock.advance(2.5)
    assert not waiter.done()
    await clock.advance(0.5)
    await asyncio.wait_for(waiter, 1)
    assert clock.monotonic() == pytest.approx(5.0)


async def test_the_sweep_marks_hosts_without_being_asked() -> None:
    clock = FakeClock()
    changes: list[tuple[str, bool]] = []
    t = tracker(clock, changes)
    t.beat("a")
    t.beat("b", period_s=2.0)
    sweep = asyncio.create_task(t.run())
    try:
        await clock.advance(3.0)
        assert ("a", False) in changes and ("b", False) not in changes
        await clock.advance(3.0)
        assert ("b", False) in changes
    finally:
        sweep.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sweep


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        LivenessTracker(FakeClock(), default_period_s=0)
    with pytest.raises(ValueError):
        LivenessTracker(FakeClock(), missed=0)
