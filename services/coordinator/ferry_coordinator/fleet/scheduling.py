"""Which queued migration starts next, and what holds each of the others.

One pure function, :func:`plan`, serves both the store's atomic ``claim_next`` (which runs it
inside its transaction and takes the first startable entry) and the explanation published
to followers (every queued entry with its reason), so the two never disagree.

Order: effective priority first (the entry's priority, raised one level per ``ageing_s``
waited, up to the highest); within a level, fair share between groups (the group holding
fewest slots goes next, so two drains hold slots within one of each other); then first come,
first served. Entries that cannot start are decided too, without blocking those behind them.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from .queue import Decision, EntryState, Limits, Priority, QueueEntry, Reason

LEVEL = 100  # one priority level, as Priority spaces them
TOP = int(max(Priority))


def effective_priority(entry: QueueEntry, now: float, ageing_s: float) -> int:
    """The entry's priority plus one level per ``ageing_s`` it has waited, at most the top."""
    waited = max(0.0, now - entry.enqueued_at)
    return min(TOP, int(entry.priority) + LEVEL * int(waited // ageing_s))


@dataclass
class Usage:
    """Slots held: in flight cluster-wide, out of each source, into each target, per group."""

    cluster: int = 0
    outbound: Counter[str] = field(default_factory=Counter)
    inbound: Counter[str] = field(default_factory=Counter)
    groups: Counter[str] = field(default_factory=Counter)
    automatic: int = 0

    @classmethod
    def of(cls, started: Iterable[QueueEntry]) -> Usage:
        usage = cls()
        for e in started:
            if e.state is EntryState.STARTED and e.target_host is not None:
                usage.take(e, e.target_host)
        return usage

    def take(self, entry: QueueEntry, target: str) -> None:
        self.cluster += 1
        self.outbound[entry.source_host] += 1
        self.inbound[target] += 1
        self.groups[entry.group] += 1
        if entry.priority is Priority.REBALANCE:
            self.automatic += 1

    def check(self, entry: QueueEntry, limits: Limits) -> tuple[Reason | None, str | None]:
        """What holds ``entry`` now, or None and the target it would take."""
        if entry.awaiting_inventory:
            return Reason.AWAITING_INVENTORY, None
        if entry.policy_block is not None:
            return Reason.POLICY_BLOCKED, None
        if not entry.candidates:
            return Reason.NO_CAPACITY, None
        if entry.priority is Priority.REBALANCE and self.automatic >= limits.automatic:
            return Reason.AUTOMATIC_LIMIT, None
        # a host's own limit first: it still holds the entry when a cluster slot frees
        if self.outbound[entry.source_host] >= limits.outbound_per_host:
            return Reason.SOURCE_OUTBOUND, None
        target = next((t for t in entry.candidates if self.inbound[t] < limits.inbound_per_host), None)
        if target is None:
            return Reason.TARGET_INBOUND, None
        if self.cluster >= limits.cluster:
            return Reason.CLUSTER_LIMIT, None
        return None, target


def plan(entries: Iterable[QueueEntry], limits: Limits, now: float) -> list[Decision]:
    """Every queued entry of ``entries`` in start order, each with what holds it.

    ``entries`` are the live ones (queued and started; others are ignored): the started ones
    hold the slots. An entry marked startable takes its slot in the plan, so those after it
    see the limits as they will be once it has started.
    """
    live = list(entries)
    usage = Usage.of(live)
    levels: dict[int, dict[str, deque[QueueEntry]]] = {}
    queued = sorted(
        (e for e in live if e.state is EntryState.QUEUED),
        key=lambda e: (e.enqueued_at, e.migration_id),
    )
    for e in queued:
        level = effective_priority(e, now, limits.ageing_s)
        levels.setdefault(level, {}).setdefault(e.group, deque()).append(e)
    out: list[Decision] = []
    for level in sorted(levels, reverse=True):
        groups = levels[level]
        # the group holding fewest slots goes next; ties go to the one waiting longest
        heap = [(usage.groups[g], q[0].enqueued_at, q[0].migration_id, g) for g, q in groups.items()]
        heapq.heapify(heap)
        while heap:
            *_, group = heapq.heappop(heap)
            todo = groups[group]
            entry = todo.popleft()
            reason, target = usage.check(entry, limits)
            if reason is None and target is not None:
                usage.take(entry, target)
            out.append(Decision(entry, reason, target, level))
            if todo:
                head = todo[0]
                heapq.heappush(heap, (usage.groups[group], head.enqueued_at, head.migration_id, group))
    return out


def start_next(entries: Iterable[QueueEntry], limits: Limits, owner: str, now: float) -> QueueEntry | None:
    """The entry that starts next, as started by ``owner`` on its target; None if none can.
    Every store's ``claim_next`` runs this on the live entries it read in its transaction."""
    decision = next((d for d in plan(entries, limits, now) if d.startable), None)
    if decision is None or decision.target is None:
        return None
    return decision.entry.started(decision.target, owner, now)
