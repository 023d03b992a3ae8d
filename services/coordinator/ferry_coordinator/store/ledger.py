"""The balancer's one row (:mod:`ferry_coordinator.autonomic`), kept beside the queue and the
drains in every saga store backend, in a table of its own (``ferry_autonomic``) created on first
use. Every write is a compare-and-set on ``version``: two replicas never both succeed."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from ferry_common.state import immediate_transaction

ROW = "balancer"


@dataclass
class Doc:
    """The row: the lease and the body, at ``version``."""

    owner: str | None = None
    lease_until: float = 0.0
    version: int = 0
    body: dict[str, Any] = field(default_factory=dict)


class Ledger(Protocol):
    async def read(self) -> Doc: ...

    async def write(self, doc: Doc, *, expect: int) -> bool:
        """Store ``doc`` (version ``expect + 1``) if the row is still at ``expect``."""


class MemoryLedger:
    def __init__(self) -> None:
        self._doc = Doc()

    async def read(self) -> Doc:
        d = self._doc
        return Doc(d.owner, d.lease_until, d.version, orjson.loads(orjson.dumps(d.body)))

    async def write(self, doc: Doc, *, expect: int) -> bool:
        if self._doc.version != expect:
            return False
        self._doc = Doc(doc.owner, doc.lease_until, expect + 1, orjson.loads(orjson.dumps(doc.body)))
        doc.version = expect + 1
        return True


_SQL_TABLE = ("CREATE TABLE IF NOT EXISTS ferry_autonomic (id TEXT PRIMARY KEY, owner TEXT, "
              "lease_until DOUBLE PRECISION NOT NULL, version BIGINT NOT NULL, body TEXT NOT NULL)")


class SqliteLedger:
    def __init__(self, conn: Any, lock: asyncio.Lock) -> None:
        self._conn, self._lock = conn, lock
        self._ready = False

    async def _table(self) -> None:
        if not self._ready:
            async with immediate_transaction(self._conn, self._lock):
                await self._conn.execute(_SQL_TABLE)
            self._ready = True

    async def read(self) -> Doc:
        await self._table()
        async with self._lock, self._conn.execute(
                "SELECT owner, lease_until, version, body FROM ferry_autonomic WHERE id = ?", (ROW,)) as cur:
            row = await cur.fetchone()
        return Doc() if row is None else Doc(row[0], float(row[1]), int(row[2]), orjson.loads(row[3]))

    async def write(self, doc: Doc, *, expect: int) -> bool:
        await self._table()
        body = orjson.dumps(doc.body).decode()
        async with immediate_transaction(self._conn, self._lock):
            if expect == 0:
                cur = await self._conn.execute(
                    "INSERT OR IGNORE INTO ferry_autonomic VALUES (?, ?, ?, 1, ?)", (ROW, doc.owner, doc.lease_until, body))
            else:
                cur = await self._conn.execute(
                    "UPDATE ferry_autonomic SET owner = ?, lease_until = ?, version = ?, body = ? "
                    "WHERE id = ? AND version = ?", (doc.owner, doc.lease_until, expect + 1, body, ROW, expect))
            ok: bool = cur.rowcount == 1
        if ok:
            doc.version = expect + 1
        return ok


class PostgresLedger:
    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._ready = False

    async def _table(self) -> None:
        if not self._ready:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(7212016)")  # replicas starting together
                await conn.execute(_SQL_TABLE)
            self._ready = True

    async def read(self) -> Doc:
        await self._table()
        row = await self._pool.fetchrow(
            "SELECT owner, lease_until, version, body FROM ferry_autonomic WHERE id = $1", ROW)
        return Doc() if row is None else Doc(row[0], float(row[1]), int(row[2]), orjson.loads(row[3]))

    async def write(self, doc: Doc, *, expect: int) -> bool:
        await self._table()
        body = orjson.dumps(doc.body).decode()
        if expect == 0:
            status = await self._pool.execute(
                "INSERT INTO ferry_autonomic VALUES ($1, $2, $3, 1, $4) ON CONFLICT (id) DO NOTHING",
                ROW, doc.owner, doc.lease_until, body)
        else:
            status = await self._pool.execute(
                "UPDATE ferry_autonomic SET owner = $2, lease_until = $3, version = $4, body = $5 "
                "WHERE id = $1 AND version = $6", ROW, doc.owner, doc.lease_until, expect + 1, body, expect)
        ok = str(status).endswith(" 1")
        if ok:
            doc.version = expect + 1
        return ok
