"""The fleet queue in the SQLite saga store's file.

Every write, ``claim_next`` included, is one ``BEGIN IMMEDIATE`` transaction: it holds the
file's write lock from its first statement, so coordinators sharing the file claim one at a
time and each sees the slots the one before took.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Collection
from dataclasses import replace
from typing import Any

import aiosqlite
import orjson

from ferry_coordinator.fleet.queue import Decision, EntryState, Limits, QueueEntry
from ferry_coordinator.fleet.scheduling import plan, start_next

from .base import Change, FleetQueue
from .queue_sql import LIVE_SQL, STARTED, default_limits, entry_from, queue_schema, row_params
from .sqlite_records import SqliteRecords

SCHEMA = (
    queue_schema(real="REAL", json="TEXT")
    + f"INSERT INTO ferry_fleet_limits (id, body) VALUES (1, '{orjson.dumps(default_limits()).decode()}')"
    + " ON CONFLICT DO NOTHING;\n"
)

RELEASE_SQL = (
    "UPDATE ferry_fleet_queue SET state = 'done', "
    "body = json_set(body, '$.state', 'done', '$.ended_at', ?) "
    f"WHERE id = ? AND state = '{STARTED}'"
)


def _dump(body: dict[str, Any]) -> str:
    return orjson.dumps(body).decode()


class SqliteFleetQueue(SqliteRecords[QueueEntry], FleetQueue):
    """A :class:`~ferry_coordinator.store.base.FleetQueue` on the saga store's connection."""

    def __init__(self, conn: aiosqlite.Connection, lock: asyncio.Lock) -> None:
        super().__init__(conn, lock, entry_from)

    async def _limits(self) -> Limits:
        async with self._conn.execute("SELECT body FROM ferry_fleet_limits WHERE id = 1") as cur:
            row = await cur.fetchone()
        return Limits.from_dict(orjson.loads(row[0]) if row else default_limits())

    async def _live(self) -> builtins.list[QueueEntry]:
        return await self._many(f"SELECT body FROM ferry_fleet_queue WHERE state IN {LIVE_SQL}", ())

    async def _put(self, entry: QueueEntry) -> None:
        await self._conn.execute(
            "UPDATE ferry_fleet_queue SET state = ?, body = ? WHERE id = ?",
            (entry.state.value, _dump(entry.to_dict()), entry.migration_id),
        )

    async def limits(self) -> Limits:
        async with self._lock:
            return await self._limits()

    async def set_limits(self, limits: Limits) -> Limits:
        async with self._write():
            await self._conn.execute(
                "UPDATE ferry_fleet_limits SET body = ? WHERE id = 1", (_dump(limits.to_dict()),)
            )
        return limits

    async def enqueue(self, entry: QueueEntry) -> tuple[QueueEntry, bool]:
        entry = replace(entry, state=EntryState.QUEUED)
        mid, vm_id, state, grp, at, body = row_params(entry)
        async with self._write():
            # no conflict target: the id and the one-live-entry-per-VM index, in one step
            async with self._conn.execute(
                "INSERT INTO ferry_fleet_queue (id, vm_id, state, grp, enqueued_at, body) "
                "VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING RETURNING id",
                (mid, vm_id, state, grp, at, _dump(body)),
            ) as cur:
                created = await cur.fetchone() is not None
            if created:
                return entry, True
            existing = await self._one(
                "SELECT body FROM ferry_fleet_queue WHERE id = ? "
                f"OR (vm_id = ? AND state IN {LIVE_SQL}) ORDER BY (id = ?) DESC LIMIT 1",
                (mid, vm_id, mid),
            )
        if existing is None:  # pragma: no cover - impossible while we hold the write lock
            raise RuntimeError(f"queue entry {mid} neither inserted nor found")
        return existing, False

    async def get(self, migration_id: str) -> QueueEntry | None:
        async with self._lock:
            return await self._one("SELECT body FROM ferry_fleet_queue WHERE id = ?", (migration_id,))

    async def entries(
        self, *, states: Collection[EntryState] | None = None, group: str | None = None
    ) -> builtins.list[QueueEntry]:
        where, params = ["1 = 1"], []
        if states is not None:
            where.append(f"state IN ({','.join('?' * len(states))})")
            params += [EntryState(s).value for s in states]
        if group is not None:
            where.append("grp = ?")
            params.append(group)
        async with self._lock:
            return await self._many(
                f"SELECT body FROM ferry_fleet_queue WHERE {' AND '.join(where)} "
                "ORDER BY enqueued_at, id",
                tuple(params),
            )

    async def claim_next(self, owner: str, *, now: float) -> QueueEntry | None:
        async with self._write():
            started = start_next(await self._live(), await self._limits(), owner, now)
            if started is not None:
                await self._put(started)
        return started

    async def release(self, migration_id: str, *, now: float) -> QueueEntry | None:
        async with self._write():
            await self._conn.execute(RELEASE_SQL, (now, migration_id))
            return await self._one("SELECT body FROM ferry_fleet_queue WHERE id = ?", (migration_id,))

    async def change_queued(self, migration_id: str, change: Change) -> QueueEntry | None:
        async with self._write():
            entry = await self._one("SELECT body FROM ferry_fleet_queue WHERE id = ?", (migration_id,))
            if entry is not None and entry.state is EntryState.QUEUED:
                entry = change(entry)
                await self._put(entry)
        return entry

    async def explain(self, *, now: float) -> builtins.list[Decision]:
        # one transaction, so the entries and the limits are of one moment (another process
        # may write between two statements otherwise); it writes nothing, so commits no page
        async with self._write():
            live, limits = await self._live(), await self._limits()
        return plan(live, limits, now)
