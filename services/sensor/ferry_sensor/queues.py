"""Per-VM event queues: one queue per element, merged in time order (VM element first on ties)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

from ferry_common.messages.domain import Event

Mode = Literal["active", "frozen", "staged"]
SEEN_WINDOW = 250_000


def order_key(event: Event) -> tuple[float, int, str]:
    # the seed merges the VM element's queue first, then the dependents'
    return (event.ts, 0 if event.element_id == event.vm_id else 1, event.id)


@dataclass
class VmEvents:
    """What the sensor holds for one VM."""

    vm_id: str
    mode: Mode
    migration_id: str | None = None
    queues: dict[str, list[Event]] = field(default_factory=dict)
    seen: OrderedDict[str, None] = field(default_factory=OrderedDict)
    frozen_at: float | None = None
    seq: int = 0  # key of the next queued event in the state store
    completed_by: str | None = None  # the migration that made this host the owner, if one did
    epoch: int = 0  # the ownership epoch that migration gave
    # a backlog is being dispatched: live events wait behind it, so none overtakes it
    draining: bool = False
    # a dispatch failed (the connection went): live events are held, in time order, until
    # a drain gets everything held out, so none overtakes one that failed
    suspended: bool = False

    def meta(self) -> dict[str, object]:
        return {"mode": self.mode, "migration_id": self.migration_id, "completed_by": self.completed_by,
                "epoch": self.epoch}

    def first_time(self, event_id: str) -> bool:
        """False for an id seen lately (a duplicate delivery); remembers a bounded window."""
        if event_id in self.seen:
            return False
        self.seen[event_id] = None
        if len(self.seen) > SEEN_WINDOW:
            self.seen.popitem(last=False)
        return True

    def add(self, event: Event) -> bool:
        """Queue ``event``; False if it was already here."""
        if not self.first_time(event.id):
            return False
        self.queues.setdefault(event.element_id, []).append(event)
        self.seq += 1
        return True

    def requeue(self, event: Event) -> None:
        """Queue ``event``, already seen here, whose dispatch failed."""
        self.queues.setdefault(event.element_id, []).append(event)
        self.seq += 1

    def store_key(self) -> str:
        """Key of the event :meth:`add` just queued."""
        return f"{self.seq:012d}"

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def merged(self) -> list[Event]:
        """Every queued event, in time order (the seed merges per-element queues; one sort of
        all of them gives the same order, since ``order_key`` is total, and timsort takes
        each queue's already ordered run as it is)."""
        return sorted((e for q in self.queues.values() for e in q), key=order_key)
