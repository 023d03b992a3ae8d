"""Host drains in the SQLite saga store's file, on its connection: a drain's write and its
queue entries change in one ``BEGIN IMMEDIATE`` transaction."""

from __future__ import annotations

import asyncio
import builtins
from dataclasses import replace

import aiosqlite
import orjson

from ferry_common.errors import Conflict
from ferry_coordinator.fleet.drain import Drain, DrainState
from ferry_coordinator.fleet.queue import EntryState, QueueEntry

from .queue_sql import LIVE_SQL, QUEUED, entry_from, row_params
from .sqlite_records import SqliteRecords

SCHEMA = """
CREATE TABLE IF NOT EXISTS ferry_drains (
    id         TEXT PRIMARY KEY,
    host       TEXT NOT NULL,
    state      TEXT NOT NULL,
    created_at REAL NOT NULL,
    version    INTEGER NOT NULL,
    open       INTEGER NOT NULL DEFAULT 1,
    body       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ferry_drains_open ON ferry_drains (open) WHERE open = 1;
CREATE UNIQUE INDEX IF NOT EXISTS ferry_drains_one_active_per_host
    ON ferry_drains (host) WHERE state = 'draining';
CREATE INDEX IF NOT EXISTS ferry_drains_host ON ferry_drains (host, created_at);
"""


def _dump(d: Drain) -> str:
    return orjson.dumps(d.to_dict()).decode()


class SqliteDrainStore(SqliteRecords[Drain]):
    def __init__(self, conn: aiosqlite.Connection, lock: asyncio.Lock) -> None:
        super().__init__(conn, lock, Drain.from_dict)

    async def create(self, drain: Drain) -> tuple[Drain, bool]:
        stored = replace(drain, version=1)
        async with self._write():
            async with self._conn.execute(
                "INSERT INTO ferry_drains (id, host, state, created_at, version, open, body) VALUES (?,?,?,?,?,?,?) "
                "ON CONFLICT DO NOTHING RETURNING id",
                (drain.drain_id, drain.host, drain.state.value, drain.created_at, 1, int(stored.open), _dump(stored)),
            ) as cur:
                if await cur.fetchone() is not None:
                    return stored, True
            existing = await self._one(
                "SELECT body FROM ferry_drains WHERE id = ? OR (host = ? AND state = 'draining') "
                "ORDER BY (id = ?) DESC LIMIT 1",
                (drain.drain_id, drain.host, drain.drain_id),
            )
        assert existing is not None
        return existing, False

    async def get(self, drain_id: str) -> Drain | None:
        async with self._lock:
            return await self._one("SELECT body FROM ferry_drains WHERE id = ?", (drain_id,))

    async def latest(self, host: str) -> Drain | None:
        async with self._lock:
            return await self._one(
                "SELECT body FROM ferry_drains WHERE host = ? ORDER BY created_at DESC, id DESC LIMIT 1", (host,)
            )

    async def list(self, *, active: bool = False) -> builtins.list[Drain]:
        where = "WHERE state = 'draining'" if active else ""
        async with self._lock:
            return await self._many(f"SELECT body FROM ferry_drains {where} ORDER BY created_at, id", ())

    async def open(self) -> builtins.list[Drain]:
        async with self._lock:
            return await self._many("SELECT body FROM ferry_drains WHERE open = 1 ORDER BY created_at, id", ())

    async def save(self, drain: Drain) -> Drain:
        stored = replace(drain, version=drain.version + 1)
        async with self._write():
            async with self._conn.execute(
                "UPDATE ferry_drains SET state = ?, version = ?, open = ?, body = ? WHERE id = ? AND version = ? RETURNING id",
                (drain.state.value, stored.version, int(stored.open), _dump(stored), drain.drain_id, drain.version),
            ) as cur:
                if await cur.fetchone() is None:
                    raise Conflict(f"drain {drain.drain_id} changed or does not exist (version {drain.version})")
        return stored

    async def enqueue(self, drain_id: str, entry: QueueEntry) -> QueueEntry | None:
        entry = replace(entry, state=EntryState.QUEUED)
        mid, vm_id, state, grp, at, body = row_params(entry)
        async with self._write():
            async with self._conn.execute("SELECT state FROM ferry_drains WHERE id = ?", (drain_id,)) as cur:
                row = await cur.fetchone()
            if row is None or row[0] != DrainState.DRAINING.value:
                return None
            await self._conn.execute(
                "INSERT INTO ferry_fleet_queue (id, vm_id, state, grp, enqueued_at, body) "
                "VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                (mid, vm_id, state, grp, at, orjson.dumps(body).decode()),
            )
            async with self._conn.execute(
                "SELECT body FROM ferry_fleet_queue WHERE id = ? "
                f"OR (vm_id = ? AND state IN {LIVE_SQL}) ORDER BY (id = ?) DESC LIMIT 1",
                (mid, vm_id, mid),
            ) as cur:
                found = await cur.fetchone()
        return entry_from(orjson.loads(found[0])) if found else None

    async def cancel(
        self, drain_id: str, *, now: float, reason: str, state: DrainState = DrainState.CANCELLED
    ) -> Drain | None:
        async with self._write():
            drain = await self._one("SELECT body FROM ferry_drains WHERE id = ?", (drain_id,))
            if drain is None:
                return None
            if drain.active:
                drain = replace(drain.to(state, now=now, reason=reason), version=drain.version + 1)
                await self._conn.execute(
                    "UPDATE ferry_drains SET state = ?, version = ?, open = ?, body = ? WHERE id = ?",
                    (drain.state.value, drain.version, int(drain.open), _dump(drain), drain_id),
                )
            await self._conn.execute(
                "UPDATE ferry_fleet_queue SET state = 'cancelled', "
                "body = json_set(body, '$.state', 'cancelled', '$.ended_at', ?) "
                f"WHERE grp = ? AND state = '{QUEUED}'",
                (now, drain_id),
            )
        return drain

    async def cordoned(self) -> set[str]:
        out: set[str] = set()
        async with self._lock, self._conn.execute(
            "SELECT d.host, d.body FROM ferry_drains d WHERE d.created_at = "
            "(SELECT MAX(created_at) FROM ferry_drains e WHERE e.host = d.host)"
        ) as cur:
            for host, body in await cur.fetchall():
                if orjson.loads(body).get("cordoned"):
                    out.add(host)
        return out
