"""The in-process fleet queue (demo, unit tests): one dict, and no await inside a method,
so each method is atomic on the event loop."""

from __future__ import annotations

import builtins
from collections.abc import Collection
from dataclasses import replace

from ferry_coordinator.fleet.queue import Decision, EntryState, Limits, QueueEntry
from ferry_coordinator.fleet.scheduling import plan, start_next

from .base import Change, FleetQueue


class MemoryFleetQueue(FleetQueue):
    def __init__(self) -> None:
        self._entries: dict[str, QueueEntry] = {}
        self._limits = Limits()

    def _live(self) -> builtins.list[QueueEntry]:
        return [e for e in self._entries.values() if e.live]

    async def limits(self) -> Limits:
        return self._limits

    async def set_limits(self, limits: Limits) -> Limits:
        self._limits = limits
        return limits

    async def enqueue(self, entry: QueueEntry) -> tuple[QueueEntry, bool]:
        existing = self._entries.get(entry.migration_id)
        if existing is None:
            existing = next((e for e in self._live() if e.vm_id == entry.vm_id), None)
        if existing is not None:
            return existing, False
        # through the dict form, as the durable stores do: the caller's request dict is not shared
        stored = QueueEntry.from_dict({**entry.to_dict(), "state": EntryState.QUEUED.value})
        self._entries[entry.migration_id] = stored
        return stored, True

    async def get(self, migration_id: str) -> QueueEntry | None:
        return self._entries.get(migration_id)

    async def entries(
        self, *, states: Collection[EntryState] | None = None, group: str | None = None
    ) -> builtins.list[QueueEntry]:
        out = [
            e
            for e in self._entries.values()
            if (states is None or e.state in states) and (group is None or e.group == group)
        ]
        return sorted(out, key=lambda e: (e.enqueued_at, e.migration_id))

    async def claim_next(self, owner: str, *, now: float) -> QueueEntry | None:
        started = start_next(self._live(), self._limits, owner, now)
        if started is not None:
            self._entries[started.migration_id] = started
        return started

    def release_now(self, migration_id: str, now: float) -> QueueEntry | None:
        entry = self._entries.get(migration_id)
        if entry is not None and entry.state is EntryState.STARTED:
            entry = self._entries[migration_id] = replace(entry, state=EntryState.DONE, ended_at=now)
        return entry

    async def release(self, migration_id: str, *, now: float) -> QueueEntry | None:
        return self.release_now(migration_id, now)

    async def change_queued(self, migration_id: str, change: Change) -> QueueEntry | None:
        entry = self._entries.get(migration_id)
        if entry is not None and entry.state is EntryState.QUEUED:
            entry = self._entries[migration_id] = change(entry)
        return entry

    async def explain(self, *, now: float) -> builtins.list[Decision]:
        return plan(self._live(), self._limits, now)

