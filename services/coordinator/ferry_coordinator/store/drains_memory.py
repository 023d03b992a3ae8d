"""Host drains in process (demo, unit tests): no await inside a method, so each is atomic."""

from __future__ import annotations

import builtins
from dataclasses import replace

from ferry_common.errors import Conflict
from ferry_coordinator.fleet.drain import Drain, DrainState
from ferry_coordinator.fleet.queue import EntryState, QueueEntry

from .queue_memory import MemoryFleetQueue


class MemoryDrainStore:
    def __init__(self, queue: MemoryFleetQueue) -> None:
        self._queue = queue
        self._rows: dict[str, Drain] = {}

    async def create(self, drain: Drain) -> tuple[Drain, bool]:
        existing = self._rows.get(drain.drain_id) or next(
            (d for d in self._rows.values() if d.host == drain.host and d.active), None
        )
        if existing is not None:
            return existing.copy(), False
        stored = replace(drain.copy(), version=1)
        self._rows[drain.drain_id] = stored
        return stored.copy(), True

    async def get(self, drain_id: str) -> Drain | None:
        row = self._rows.get(drain_id)
        return row.copy() if row else None

    async def latest(self, host: str) -> Drain | None:
        rows = [d for d in self._rows.values() if d.host == host]
        return max(rows, key=lambda d: (d.created_at, d.drain_id)).copy() if rows else None

    async def list(self, *, active: bool = False) -> builtins.list[Drain]:
        rows = [d.copy() for d in self._rows.values() if d.active or not active]
        return sorted(rows, key=lambda d: (d.created_at, d.drain_id))

    async def open(self) -> builtins.list[Drain]:
        return [d for d in await self.list() if d.open]

    async def save(self, drain: Drain) -> Drain:
        row = self._rows.get(drain.drain_id)
        if row is None:
            raise Conflict(f"drain {drain.drain_id} does not exist")
        if row.version != drain.version:
            raise Conflict(f"drain {drain.drain_id} changed (version {row.version}, not {drain.version})")
        stored = replace(drain.copy(), version=row.version + 1)
        self._rows[drain.drain_id] = stored
        return stored.copy()

    async def enqueue(self, drain_id: str, entry: QueueEntry) -> QueueEntry | None:
        row = self._rows.get(drain_id)
        if row is None or not row.active:
            return None
        stored, _ = await self._queue.enqueue(entry)  # no await point inside: still atomic
        return stored

    async def cancel(
        self, drain_id: str, *, now: float, reason: str, state: DrainState = DrainState.CANCELLED
    ) -> Drain | None:
        row = self._rows.get(drain_id)
        if row is None:
            return None
        if row.active:
            row = self._rows[drain_id] = replace(row.to(state, now=now, reason=reason), version=row.version + 1)
        for e in await self._queue.entries(states=(EntryState.QUEUED,), group=drain_id):
            await self._queue.cancel(e.migration_id, now=now)
        return row.copy()

    async def cordoned(self) -> set[str]:
        latest: dict[str, Drain] = {}
        for d in self._rows.values():
            if d.host not in latest or (d.created_at, d.drain_id) > (latest[d.host].created_at, latest[d.host].drain_id):
                latest[d.host] = d
        return {h for h, d in latest.items() if d.cordoned}
