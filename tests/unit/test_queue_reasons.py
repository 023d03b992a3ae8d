"""The queue's pure parts: start order edge cases and which reason changes are announced."""

from __future__ import annotations

import pytest

from ferry_coordinator.fleet.queue import Decision, Limits, Priority, Reason, new_entry
from ferry_coordinator.fleet.reasons import ReasonLog
from ferry_coordinator.fleet.scheduling import effective_priority, plan


def test_reasons_are_announced_once_and_again_when_they_change() -> None:
    a = new_entry("m-1", "vm-1", "h1", ["h2"], now=0.0)
    b = new_entry("m-2", "vm-2", "h3", ["h4"], now=0.0)
    log = ReasonLog()
    first = log.changes([Decision(a, Reason.CLUSTER_LIMIT), Decision(b, None, "h4")])
    assert [d.entry.migration_id for d in first] == ["m-1"]
    assert log.changes([Decision(a, Reason.CLUSTER_LIMIT), Decision(b, None, "h4")]) == []
    changed = log.changes([Decision(a, Reason.TARGET_INBOUND), Decision(b, Reason.CLUSTER_LIMIT)])
    assert [(d.entry.migration_id, d.reason) for d in changed] == [
        ("m-1", Reason.TARGET_INBOUND),
        ("m-2", Reason.CLUSTER_LIMIT),
    ]
    # m-1 left the queue (started or cancelled); if it came back it would be told again
    assert log.changes([Decision(b, Reason.CLUSTER_LIMIT)]) == []
    assert len(log.changes([Decision(a, Reason.TARGET_INBOUND), Decision(b, Reason.CLUSTER_LIMIT)])) == 1


def test_ageing_raises_one_level_per_period_up_to_the_top() -> None:
    e = new_entry("m-1", "vm-1", "h1", ["h2"], priority=Priority.REBALANCE, now=0.0)
    assert effective_priority(e, 59.0, 60.0) == Priority.REBALANCE
    assert effective_priority(e, 60.0, 60.0) == Priority.OPERATOR
    assert effective_priority(e, 10_000.0, 60.0) == Priority.EVACUATION


def test_a_blocked_entry_does_not_hold_up_those_behind_it() -> None:
    limits = Limits(cluster=5, outbound_per_host=1, inbound_per_host=1)
    stuck = new_entry("m-1", "vm-1", "h1", [], now=0.0)  # nowhere to go
    busy = new_entry("m-2", "vm-2", "h2", ["h3"], now=1.0).started("h3", "r", 1.0)
    behind_busy = new_entry("m-3", "vm-3", "h4", ["h3"], now=2.0)  # h3's inbound is taken
    free = new_entry("m-4", "vm-4", "h5", ["h3", "h6"], now=3.0)  # falls back to h6
    decisions = {d.entry.migration_id: (d.reason, d.target) for d in plan([stuck, busy, behind_busy, free], limits, 10.0)}
    assert decisions == {
        "m-1": (Reason.NO_CAPACITY, None),
        "m-3": (Reason.TARGET_INBOUND, None),
        "m-4": (None, "h6"),
    }


def test_priority_names_parse() -> None:
    assert Priority.parse("drain") is Priority.DRAIN
    with pytest.raises(ValueError, match="evacuation"):
        Priority.parse("urgent")
