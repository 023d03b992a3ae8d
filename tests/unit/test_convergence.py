"""The convergence ladder as a decision function: samples of pre-copy and a fake clock in,
raise / post-copy / abort out (drivers/convergence.py)."""

from __future__ import annotations

import pytest

from ferry_common.errors import InvalidMessage
from ferry_hypervisor_adapter.drivers.base import MigrationParams
from ferry_hypervisor_adapter.drivers.convergence import Convergence, Ladder

MIB = 1024 * 1024


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _conv(clock: FakeClock, **params: object) -> Convergence:
    return Convergence(Ladder.of(MigrationParams(**params)), clock)  # type: ignore[arg-type]


def _stall_by_passes(conv: Convergence, start_pass: int, remaining: int = 64 * MIB) -> list[str]:
    """Samples at a flat ``remaining`` over passes until the ladder acts; the actions seen."""
    actions = []
    for p in range(start_pass, start_pass + 10):
        d = conv.observe(remaining, p)
        actions.append(d.action)
        if d.action != "wait":
            break
    return actions


def test_the_default_ladder_is_ovirts_shape_and_postcopy_is_forbidden() -> None:
    ladder = Ladder.of(MigrationParams())
    assert ladder.downtimes_ms == (100, 150, 200, 300, 400, 500)
    assert not ladder.postcopy and ladder.stall_passes == 3


def test_a_stall_of_passes_raises_one_rung_each_then_aborts_when_postcopy_is_forbidden() -> None:
    clock = FakeClock()
    conv = _conv(clock)
    seen = []
    p = 0
    for _ in range(5):
        assert _stall_by_passes(conv, p)[-1] == "raise"
        seen.append(conv.downtime_ms)
        p += 10
    assert seen == [150, 200, 300, 400, 500]
    last = conv.observe(64 * MIB, p)  # the top rung's first sample is its low
    assert last.action == "wait"
    actions = _stall_by_passes(conv, p + 1)
    assert actions[-1] == "abort" and conv.aborted
    assert "stall timeout" in conv.reason and "forbids post-copy" in conv.reason
    assert conv.observe(1, p + 100).action == "wait"  # decided once: nothing follows an abort


def test_a_stall_on_the_top_rung_starts_postcopy_where_allowed() -> None:
    clock = FakeClock()
    conv = _conv(clock, downtime_limit_ms=100, downtime_ladder_ms=(200,), postcopy="allow")
    assert _stall_by_passes(conv, 0)[-1] == "raise" and conv.downtime_ms == 200
    decision = None
    for p in range(20, 30):
        decision = conv.observe(64 * MIB, p)
        if decision.action != "wait":
            break
    assert decision is not None and decision.action == "postcopy" and decision.rung == 1
    assert conv.postcopy_requested and conv.past_cancel and not conv.aborted
    assert conv.observe(64 * MIB, 99).action == "wait"  # post-copy is started once


def test_time_without_a_new_low_is_a_stall_too() -> None:
    clock = FakeClock()
    conv = _conv(clock, stall_passes=1000, stall_timeout_s=5.0)
    assert conv.observe(10 * MIB, 1).action == "wait"
    clock.t += 4.9
    assert conv.observe(12 * MIB, 1).action == "wait"
    clock.t += 0.2
    d = conv.observe(12 * MIB, 1)
    assert (d.action, d.rung, d.downtime_ms) == ("raise", 1, 150)


def test_a_new_low_resets_the_stall() -> None:
    clock = FakeClock()
    conv = _conv(clock, stall_passes=3, stall_timeout_s=5.0)
    remaining = 64 * MIB
    for p in range(50):
        remaining -= MIB  # getting closer every pass: pre-copy converges on its own
        clock.t += 1.0
        assert conv.observe(remaining, p).action == "wait"
    assert conv.rung == 0


def test_rungs_at_or_below_the_first_downtime_are_skipped() -> None:
    assert Ladder.of(MigrationParams(downtime_limit_ms=250)).downtimes_ms == (250, 300, 400, 500)
    assert Ladder.of(MigrationParams(downtime_ladder_ms=())).downtimes_ms == (100,)


@pytest.mark.parametrize(
    "raw",
    [
        {"downtime_ladder_ms": [150, 150]},
        {"downtime_ladder_ms": [300, 200]},
        {"downtime_ladder_ms": "100,200"},
        {"downtime_ladder_ms": [100, 1.5]},
        {"downtime_ladder_ms": [True]},
        {"downtime_ladder_ms": list(range(1, 40))},
        {"postcopy": "yes"},
        {"postcopy": True},
        {"stall_passes": 0},
    ],
)
def test_bad_convergence_settings_are_refused_by_name(raw: dict[str, object]) -> None:
    with pytest.raises(InvalidMessage, match=f"migration parameter {next(iter(raw))}"):
        MigrationParams.from_dict(raw)


def test_convergence_settings_from_the_wire() -> None:
    p = MigrationParams.from_dict({"downtime_ladder_ms": [200, 800], "postcopy": "allow", "stall_passes": 2})
    assert (p.downtime_ladder_ms, p.postcopy, p.stall_passes) == ((200, 800), "allow", 2)
    assert Ladder.of(p).downtimes_ms == (100, 200, 800) and Ladder.of(p).postcopy
