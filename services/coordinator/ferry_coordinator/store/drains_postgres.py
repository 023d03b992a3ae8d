"""Host drains in the PostgreSQL saga store. A drain's row is locked (``FOR UPDATE``) by the
writes that depend on its state, so a cancel and a replica's enqueue for that drain take
turns: once the cancel commits, no entry of the drain is queued any more."""

from __future__ import annotations

import builtins
from dataclasses import replace

import asyncpg

from ferry_common.errors import Conflict
from ferry_coordinator.fleet.drain import Drain, DrainState
from ferry_coordinator.fleet.queue import EntryState, QueueEntry

from .queue_sql import LIVE_SQL, QUEUED, entry_from, row_params

SCHEMA = """
CREATE TABLE IF NOT EXISTS ferry_drains (
    id         TEXT PRIMARY KEY,
    host       TEXT NOT NULL,
    state      TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    version    INTEGER NOT NULL,
    open       BOOLEAN NOT NULL DEFAULT TRUE,
    body       JSONB NOT NULL
);
CREATE INDEX IF NOT EXISTS ferry_drains_open ON ferry_drains (open) WHERE open;
CREATE UNIQUE INDEX IF NOT EXISTS ferry_drains_one_active_per_host
    ON ferry_drains (host) WHERE state = 'draining';
CREATE INDEX IF NOT EXISTS ferry_drains_host ON ferry_drains (host, created_at);
"""

_BY_ID = "SELECT body FROM ferry_drains WHERE id = $1"


def _drain(row: asyncpg.Record | None) -> Drain | None:
    return Drain.from_dict(row["body"]) if row is not None else None


class PostgresDrainStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def create(self, drain: Drain) -> tuple[Drain, bool]:
        stored = replace(drain, version=1)
        async with self._pool.acquire() as conn:
            for _ in range(10):  # the drain that blocked us may end before we read it
                row = await conn.fetchrow(
                    "INSERT INTO ferry_drains (id, host, state, created_at, version, open, body) "
                    "VALUES ($1,$2,$3,$4,1,$5,$6) ON CONFLICT DO NOTHING RETURNING id",
                    drain.drain_id, drain.host, drain.state.value, drain.created_at, stored.open, stored.to_dict(),
                )
                if row is not None:
                    return stored, True
                existing = _drain(await conn.fetchrow(
                    "SELECT body FROM ferry_drains WHERE id = $1 OR (host = $2 AND state = 'draining') "
                    "ORDER BY (id = $1) DESC LIMIT 1",
                    drain.drain_id, drain.host,
                ))
                if existing is not None:
                    return existing, False
        raise RuntimeError(f"drain {drain.drain_id}: host {drain.host} is too contended")

    async def get(self, drain_id: str) -> Drain | None:
        return _drain(await self._pool.fetchrow(_BY_ID, drain_id))

    async def latest(self, host: str) -> Drain | None:
        return _drain(await self._pool.fetchrow(
            "SELECT body FROM ferry_drains WHERE host = $1 ORDER BY created_at DESC, id DESC LIMIT 1", host
        ))

    async def list(self, *, active: bool = False) -> builtins.list[Drain]:
        rows = await self._pool.fetch(
            "SELECT body FROM ferry_drains WHERE (NOT $1::bool OR state = 'draining') ORDER BY created_at, id", active
        )
        return [Drain.from_dict(r["body"]) for r in rows]

    async def open(self) -> builtins.list[Drain]:
        rows = await self._pool.fetch("SELECT body FROM ferry_drains WHERE open ORDER BY created_at, id")
        return [Drain.from_dict(r["body"]) for r in rows]

    async def save(self, drain: Drain) -> Drain:
        stored = replace(drain, version=drain.version + 1)
        row = await self._pool.fetchrow(
            "UPDATE ferry_drains SET state = $2, version = $3, body = $4, open = $6 "
            "WHERE id = $1 AND version = $5 RETURNING id",
            drain.drain_id, drain.state.value, stored.version, stored.to_dict(), drain.version, stored.open,
        )
        if row is None:
            raise Conflict(f"drain {drain.drain_id} changed or does not exist (version {drain.version})")
        return stored

    async def enqueue(self, drain_id: str, entry: QueueEntry) -> QueueEntry | None:
        entry = replace(entry, state=EntryState.QUEUED)
        async with self._pool.acquire() as conn, conn.transaction():
            state = await conn.fetchval("SELECT state FROM ferry_drains WHERE id = $1 FOR UPDATE", drain_id)
            if state != DrainState.DRAINING.value:
                return None
            await conn.execute(
                "INSERT INTO ferry_fleet_queue (id, vm_id, state, grp, enqueued_at, body) "
                "VALUES ($1,$2,$3,$4,$5,$6) ON CONFLICT DO NOTHING",
                *row_params(entry),
            )
            row = await conn.fetchrow(
                f"SELECT body FROM ferry_fleet_queue WHERE id = $1 OR (vm_id = $2 AND state IN {LIVE_SQL}) "
                "ORDER BY (id = $1) DESC LIMIT 1",
                entry.migration_id, entry.vm_id,
            )
        return entry_from(row["body"]) if row is not None else None

    async def cancel(
        self, drain_id: str, *, now: float, reason: str, state: DrainState = DrainState.CANCELLED
    ) -> Drain | None:
        async with self._pool.acquire() as conn, conn.transaction():
            drain = _drain(await conn.fetchrow(_BY_ID + " FOR UPDATE", drain_id))
            if drain is None:
                return None
            if drain.active:
                drain = replace(drain.to(state, now=now, reason=reason), version=drain.version + 1)
                await conn.execute(
                    "UPDATE ferry_drains SET state = $2, version = $3, body = $4, open = $5 WHERE id = $1",
                    drain_id, drain.state.value, drain.version, drain.to_dict(), drain.open,
                )
            await conn.execute(
                "UPDATE ferry_fleet_queue SET state = 'cancelled', "
                "body = body || jsonb_build_object('state', 'cancelled', 'ended_at', $1::float8) "
                f"WHERE grp = $2 AND state = '{QUEUED}'",
                now, drain_id,
            )
        return drain

    async def cordoned(self) -> set[str]:
        rows = await self._pool.fetch(
            "SELECT DISTINCT ON (host) host, body FROM ferry_drains ORDER BY host, created_at DESC, id DESC"
        )
        return {r["host"] for r in rows if r["body"].get("cordoned")}
