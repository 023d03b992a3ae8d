"""The fleet queue in the PostgreSQL saga store, shared by every coordinator replica.

``claim_next`` is one transaction that first locks the limits row (``SELECT ... FOR UPDATE``):
replicas claiming at once take turns, and each reads the slots held after the previous one
committed (READ COMMITTED takes a new snapshot per statement), so no limit is exceeded
however many replicas claim. Writes that only free or withdraw work (release, cancel) do not
take that lock: they can only make a claim's picture more conservative, and the claim's
guarded UPDATE (``state = 'queued'``) loses to a cancel that committed first.
"""

from __future__ import annotations

import builtins
from collections.abc import Collection
from dataclasses import replace

import asyncpg

from ferry_coordinator.fleet.queue import Decision, EntryState, Limits, QueueEntry
from ferry_coordinator.fleet.scheduling import plan, start_next

from .base import Change, FleetQueue
from .columns import TERMINAL_SQL
from .queue_sql import (
    LIVE_SQL,
    QUEUED,
    STARTED,
    default_limits,
    entry_from,
    queue_schema,
    row_params,
)

SCHEMA = queue_schema(real="DOUBLE PRECISION", json="JSONB")

RELEASE_SQL = (
    "UPDATE ferry_fleet_queue SET state = 'done', "
    "body = body || jsonb_build_object('state', 'done', 'ended_at', $1::float8) "
    f"WHERE id = $2 AND state = '{STARTED}'"
)


def releasing(saga_write: str, *, mid: str, status: str, at: str) -> str:
    """``saga_write`` (an INSERT or UPDATE of ``ferry_sagas`` ... RETURNING its columns) made
    to also release the migration's slot when the status it writes is terminal: one statement,
    so a saga never ends with its slot still held. ``mid``, ``status``, ``at``: its parameters."""
    return (
        f"WITH s AS ({saga_write}), r AS ("
        "UPDATE ferry_fleet_queue SET state = 'done', "
        f"body = body || jsonb_build_object('state', 'done', 'ended_at', {at}::float8) "
        f"WHERE id = {mid} AND state = '{STARTED}' AND {status}::text IN {TERMINAL_SQL} "
        "AND EXISTS (SELECT 1 FROM s)) "
        "SELECT * FROM s"
    )


_BODY_BY_ID = "SELECT body FROM ferry_fleet_queue WHERE id = $1"
_LIVE = f"SELECT body FROM ferry_fleet_queue WHERE state IN {LIVE_SQL}"


async def create_schema(conn: asyncpg.Connection) -> None:
    """Tables and the default limits (run under the store's schema lock)."""
    await conn.execute(SCHEMA)
    await conn.execute(
        "INSERT INTO ferry_fleet_limits (id, body) VALUES (1, $1) ON CONFLICT DO NOTHING",
        default_limits(),
    )


def _one(row: asyncpg.Record | None) -> QueueEntry | None:
    return entry_from(row["body"]) if row is not None else None


class PostgresFleetQueue(FleetQueue):
    """A :class:`~ferry_coordinator.store.base.FleetQueue` on the saga store's pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def limits(self) -> Limits:
        row = await self._pool.fetchrow("SELECT body FROM ferry_fleet_limits WHERE id = 1")
        return Limits.from_dict(row["body"] if row else default_limits())

    async def set_limits(self, limits: Limits) -> Limits:
        await self._pool.execute(
            "INSERT INTO ferry_fleet_limits (id, body) VALUES (1, $1) "
            "ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body",
            limits.to_dict(),
        )
        return limits

    async def enqueue(self, entry: QueueEntry) -> tuple[QueueEntry, bool]:
        entry = replace(entry, state=EntryState.QUEUED)
        async with self._pool.acquire() as conn:
            # The loop covers the entry that blocked us finishing before we read it.
            for _ in range(10):
                row = await conn.fetchrow(
                    "INSERT INTO ferry_fleet_queue (id, vm_id, state, grp, enqueued_at, body) "
                    "VALUES ($1,$2,$3,$4,$5,$6) ON CONFLICT DO NOTHING RETURNING id",
                    *row_params(entry),
                )
                if row is not None:
                    return entry, True
                existing = _one(
                    await conn.fetchrow(
                        "SELECT body FROM ferry_fleet_queue "
                        f"WHERE id = $1 OR (vm_id = $2 AND state IN {LIVE_SQL}) "
                        "ORDER BY (id = $1) DESC LIMIT 1",
                        entry.migration_id,
                        entry.vm_id,
                    )
                )
                if existing is not None:
                    return existing, False
        raise RuntimeError(f"queue entry {entry.migration_id}: VM {entry.vm_id} is too contended")

    async def get(self, migration_id: str) -> QueueEntry | None:
        return _one(await self._pool.fetchrow(_BODY_BY_ID, migration_id))

    async def entries(
        self, *, states: Collection[EntryState] | None = None, group: str | None = None
    ) -> builtins.list[QueueEntry]:
        rows = await self._pool.fetch(
            "SELECT body FROM ferry_fleet_queue "
            "WHERE ($1::text[] IS NULL OR state = ANY($1::text[])) "
            "AND ($2::text IS NULL OR grp = $2::text) ORDER BY enqueued_at, id",
            None if states is None else [EntryState(s).value for s in states],
            group,
        )
        return [entry_from(r["body"]) for r in rows]

    async def claim_next(self, owner: str, *, now: float) -> QueueEntry | None:
        async with self._pool.acquire() as conn, conn.transaction():
            # the turnstile: one claimer at a time, across every replica
            row = await conn.fetchrow("SELECT body FROM ferry_fleet_limits WHERE id = 1 FOR UPDATE")
            limits = Limits.from_dict(row["body"] if row else default_limits())
            for _ in range(10):
                live = [entry_from(r["body"]) for r in await conn.fetch(_LIVE)]
                started = start_next(live, limits, owner, now)
                if started is None:
                    return None
                done = await conn.fetchrow(
                    "UPDATE ferry_fleet_queue SET state = $2, body = $3 "
                    f"WHERE id = $1 AND state = '{QUEUED}' RETURNING id",
                    started.migration_id,
                    started.state.value,
                    started.to_dict(),
                )
                if done is not None:
                    return started
                # cancelled meanwhile: plan again without it
        return None

    async def release(self, migration_id: str, *, now: float) -> QueueEntry | None:
        async with self._pool.acquire() as conn:
            await conn.execute(RELEASE_SQL, now, migration_id)
            return _one(await conn.fetchrow(_BODY_BY_ID, migration_id))

    async def cancel(self, migration_id: str, *, now: float) -> QueueEntry | None:
        row = await self._pool.fetchrow(
            "UPDATE ferry_fleet_queue SET state = 'cancelled', "
            "body = body || jsonb_build_object('state', 'cancelled', 'ended_at', $2::float8) "
            f"WHERE id = $1 AND state = '{QUEUED}' RETURNING body",
            migration_id,
            now,
        )
        return _one(row) if row is not None else await self.get(migration_id)

    async def change_queued(self, migration_id: str, change: Change) -> QueueEntry | None:
        async with self._pool.acquire() as conn, conn.transaction():
            entry = _one(await conn.fetchrow(_BODY_BY_ID + " FOR UPDATE", migration_id))
            if entry is not None and entry.state.value == QUEUED:
                entry = change(entry)
                await conn.execute(
                    "UPDATE ferry_fleet_queue SET state = $2, body = $3 WHERE id = $1",
                    migration_id,
                    entry.state.value,
                    entry.to_dict(),
                )
        return entry

    async def explain(self, *, now: float) -> builtins.list[Decision]:
        # one snapshot for both reads
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            row = await conn.fetchrow("SELECT body FROM ferry_fleet_limits WHERE id = 1")
            live = [entry_from(r["body"]) for r in await conn.fetch(_LIVE)]
        limits = Limits.from_dict(row["body"] if row else default_limits())
        return plan(live, limits, now)
