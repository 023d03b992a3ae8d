"""The chaos checker's limit sweep over a fleet queue history."""

from __future__ import annotations

from ferry_coordinator.fleet.queue import EntryState, Limits, Priority, QueueEntry
from tests.faults.chaos_limits import exceeded


def entry(i: int, src: str, dst: str, start: float, end: float | None) -> QueueEntry:
    return QueueEntry(migration_id=f"m{i}", vm_id=f"vm{i}", source_host=src, candidates=(dst,),
                      priority=Priority.OPERATOR, group=src, enqueued_at=0.0, state=EntryState.DONE,
                      target_host=dst, started_at=start, ended_at=end)


def test_within_limits_back_to_back() -> None:
    # a slot freed at the instant another takes it is not two at once
    hist = [entry(1, "a", "b", 0, 5), entry(2, "a", "b", 5, 9), entry(3, "a", "c", 1, 4)]
    assert exceeded(hist, Limits(cluster=2, outbound_per_host=2, inbound_per_host=1)) == []


def test_each_limit_is_caught() -> None:
    hist = [entry(1, "a", "b", 0, 5), entry(2, "a", "b", 1, 6), entry(3, "a", "c", 2, None)]
    bad = exceeded(hist, Limits(cluster=2, outbound_per_host=2, inbound_per_host=1))
    assert any("cluster limit 2" in b for b in bad)
    assert any("out of a > 2" in b for b in bad)
    assert any("into b > 1" in b for b in bad)
