"""The SQLite saga store: durable sagas for a single-node coordinator (or a few on one disk).

URLs follow SQLAlchemy's convention: ``sqlite:///ferry.db`` is relative to the working
directory, ``sqlite:////var/lib/ferry/ferry.db`` is absolute, ``sqlite:///:memory:`` lives
and dies with the store.

Atomicity comes from SQLite itself, not from this process: the one-active-saga-per-VM rule
is a partial unique index, compare-and-swap is a guarded ``UPDATE``, and every write runs in
a ``BEGIN IMMEDIATE`` transaction, so several coordinator processes may share one file.
"""

from __future__ import annotations

import asyncio

# builtins.list in annotations: inside the class, ``list`` is the store's own method.
import builtins
import contextlib
from typing import Any

import aiosqlite
import orjson

from ferry_common.errors import Conflict
from ferry_common.state import immediate_transaction, sqlite_path_from_url

from .base import SagaRecord
from .columns import COLUMNS, TERMINAL_SQL, blob, record_from
from .drains_sqlite import SCHEMA as DRAINS_SCHEMA
from .drains_sqlite import SqliteDrainStore
from .ledger import SqliteLedger
from .queue_sqlite import RELEASE_SQL, SqliteFleetQueue
from .queue_sqlite import SCHEMA as QUEUE_SCHEMA

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS ferry_sagas (
    id               TEXT PRIMARY KEY,
    vm_id            TEXT NOT NULL,
    status           TEXT NOT NULL,
    owner            TEXT,
    lease_until      REAL NOT NULL DEFAULT 0,
    version          INTEGER NOT NULL,
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    body             TEXT NOT NULL
);
-- the partial indexes name the terminal set they were made for (v2: with failed); older
-- ones would keep a failed saga's VM busy forever
DROP INDEX IF EXISTS ferry_sagas_one_active_per_vm;
CREATE UNIQUE INDEX IF NOT EXISTS ferry_sagas_one_active_per_vm_v2
    ON ferry_sagas (vm_id) WHERE status NOT IN {TERMINAL_SQL};
CREATE INDEX IF NOT EXISTS ferry_sagas_vm_created ON ferry_sagas (vm_id, created_at);
CREATE INDEX IF NOT EXISTS ferry_sagas_created ON ferry_sagas (created_at);
CREATE TABLE IF NOT EXISTS ferry_saga_spans (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    migration_id TEXT NOT NULL,
    body         TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ferry_saga_spans_by_migration ON ferry_saga_spans (migration_id, seq);
"""


def _body(record: SagaRecord) -> str:
    return orjson.dumps(blob(record)).decode()


def _row_to_record(row: Any) -> SagaRecord:
    return record_from(row, orjson.loads(row[9]))


class SqliteSagaStore:
    """A :class:`~ferry_coordinator.store.base.SagaStore` on one SQLite file in WAL mode."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn
        # One connection is shared by every coroutine of this process; without the lock a
        # statement of one coroutine would land inside another's open transaction.
        self._lock = asyncio.Lock()
        self.queue = SqliteFleetQueue(conn, self._lock)
        self.drains = SqliteDrainStore(conn, self._lock)
        self.balancer = SqliteLedger(conn, self._lock)

    @classmethod
    async def open(cls, url: str) -> SqliteSagaStore:
        """Open (creating if needed) the store at ``url``."""
        path, _ = sqlite_path_from_url(url)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves rather than let the sqlite3
        # module guess, so "BEGIN IMMEDIATE" really takes the write lock up front.
        conn = await aiosqlite.connect(path, isolation_level=None)
        try:
            await conn.execute("PRAGMA busy_timeout = 10000")
            await conn.execute("PRAGMA journal_mode = WAL")
            # FULL: a saga step is acted upon right after its save; losing that save on power
            # loss would replay a step the world has already seen.
            await conn.execute("PRAGMA synchronous = FULL")
            # One transaction, so replicas starting together don't race on the DDL.
            await conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}{QUEUE_SCHEMA}{DRAINS_SCHEMA}COMMIT;")
        except BaseException:
            await conn.close()
            raise
        return cls(conn)

    async def close(self) -> None:
        async with self._lock:
            await self._conn.close()

    def _write(self) -> contextlib.AbstractAsyncContextManager[None]:
        return immediate_transaction(self._conn, self._lock)

    async def _fetchone(self, sql: str, params: tuple[Any, ...]) -> Any:
        async with self._conn.execute(sql, params) as cur:
            return await cur.fetchone()

    async def _fetchall(self, sql: str, params: tuple[Any, ...]) -> builtins.list[Any]:
        async with self._conn.execute(sql, params) as cur:
            return list(await cur.fetchall())

    async def create(self, record: SagaRecord) -> tuple[SagaRecord, bool]:
        async with self._write():
            # No conflict target: DO NOTHING covers both the primary key (same id) and the
            # partial unique index (another active saga for this VM) in one atomic step.
            async with self._conn.execute(
                f"INSERT INTO ferry_sagas ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?) "
                f"ON CONFLICT DO NOTHING RETURNING {COLUMNS}",
                (
                    record.migration_id,
                    record.vm_id,
                    record.status,
                    record.owner,
                    record.lease_until,
                    1,
                    record.created_at,
                    record.updated_at,
                    int(record.cancel_requested),
                    _body(record),
                ),
            ) as cur:
                row = await cur.fetchone()
            created = row is not None
            if created and record.terminal:  # a saga that ends as it starts frees its slot
                await self._conn.execute(RELEASE_SQL, (record.updated_at, record.migration_id))
            if row is None:
                # The write lock is still ours, so whatever blocked the insert is still there.
                row = await self._fetchone(
                    f"SELECT {COLUMNS} FROM ferry_sagas WHERE id = ?", (record.migration_id,)
                )
                if row is None:
                    row = await self._fetchone(
                        f"SELECT {COLUMNS} FROM ferry_sagas "
                        f"WHERE vm_id = ? AND status NOT IN {TERMINAL_SQL}",
                        (record.vm_id,),
                    )
        if row is None:  # pragma: no cover - impossible while we hold the write lock
            raise Conflict(f"saga {record.migration_id} could not be created")
        return _row_to_record(row), created

    async def get(self, migration_id: str) -> SagaRecord | None:
        async with self._lock:
            row = await self._fetchone(
                f"SELECT {COLUMNS} FROM ferry_sagas WHERE id = ?", (migration_id,)
            )
        return _row_to_record(row) if row else None

    async def save(self, record: SagaRecord, *, owner: str | None) -> SagaRecord:
        async with self._write():
            try:
                # owner/lease_until are never written here (only claim/renew move a lease);
                # cancel_requested is OR-ed so a concurrent request_cancel is not lost.
                async with self._conn.execute(
                    "UPDATE ferry_sagas SET vm_id = ?, status = ?, version = version + 1, "
                    "created_at = ?, updated_at = ?, "
                    "cancel_requested = (cancel_requested OR ?), body = ? "
                    "WHERE id = ? AND version = ? "
                    "AND (owner IS NULL OR ? IS NULL OR owner = ?) "
                    f"RETURNING {COLUMNS}",
                    (
                        record.vm_id,
                        record.status,
                        record.created_at,
                        record.updated_at,
                        int(record.cancel_requested),
                        _body(record),
                        record.migration_id,
                        record.version,
                        owner,
                        owner,
                    ),
                ) as cur:
                    row = await cur.fetchone()
            except aiosqlite.IntegrityError as exc:
                # Re-activating a finished saga while another one runs for the VM.
                raise Conflict(
                    f"saga {record.migration_id}: VM {record.vm_id} has another active saga"
                ) from exc
            current = None
            if row is not None and record.terminal:
                # the saga ended: its slot, if it held one, is free in the same transaction
                await self._conn.execute(RELEASE_SQL, (record.updated_at, record.migration_id))
            if row is None:
                current = await self._fetchone(
                    "SELECT version, owner FROM ferry_sagas WHERE id = ?",
                    (record.migration_id,),
                )
        if row is not None:
            return _row_to_record(row)
        if current is None:
            raise Conflict(f"saga {record.migration_id} does not exist")
        version, holder = current
        if version != record.version:
            raise Conflict(
                f"saga {record.migration_id} changed (version {version}, not {record.version})"
            )
        raise Conflict(f"saga {record.migration_id} is driven by {holder}")

    async def list(self, *, vm_id: str | None = None, limit: int = 50) -> builtins.list[SagaRecord]:
        where, params = ("WHERE vm_id = ? ", (vm_id,)) if vm_id is not None else ("", ())
        async with self._lock:
            rows = await self._fetchall(
                f"SELECT {COLUMNS} FROM ferry_sagas {where}"
                "ORDER BY created_at DESC, id DESC LIMIT ?",
                (*params, limit),
            )
        return [_row_to_record(r) for r in rows]

    async def active_for_vm(self, vm_id: str) -> SagaRecord | None:
        async with self._lock:
            row = await self._fetchone(
                f"SELECT {COLUMNS} FROM ferry_sagas "
                f"WHERE vm_id = ? AND status NOT IN {TERMINAL_SQL}",
                (vm_id,),
            )
        return _row_to_record(row) if row else None

    async def claim(
        self, owner: str, *, now: float, lease_s: float, limit: int = 100
    ) -> builtins.list[SagaRecord]:
        async with self._write():
            # The version bump fences out any replica still holding a copy of the record from
            # before it lost the lease: its next save conflicts.
            rows = await self._fetchall(
                "UPDATE ferry_sagas SET owner = ?, lease_until = ?, version = version + 1 "
                "WHERE id IN (SELECT id FROM ferry_sagas "
                f"  WHERE status NOT IN {TERMINAL_SQL} "
                "   AND (owner IS NULL OR lease_until < ?) "
                "   ORDER BY created_at, id LIMIT ?) "
                f"RETURNING {COLUMNS}",
                (owner, now + lease_s, now, limit),
            )
        records = [_row_to_record(r) for r in rows]
        records.sort(key=lambda r: (r.created_at, r.migration_id))  # RETURNING has no order
        return records

    async def renew(self, migration_id: str, owner: str, *, until: float) -> bool:
        async with self._write():
            rows = await self._fetchall(
                "UPDATE ferry_sagas SET lease_until = ? WHERE id = ? AND owner = ? RETURNING id",
                (until, migration_id, owner),
            )
        return bool(rows)

    async def request_cancel(self, migration_id: str) -> SagaRecord | None:
        async with self._write():
            # No version bump: the driver's next save merges the flag instead of conflicting.
            await self._conn.execute(
                "UPDATE ferry_sagas SET cancel_requested = 1 "
                f"WHERE id = ? AND status NOT IN {TERMINAL_SQL}",
                (migration_id,),
            )
            row = await self._fetchone(
                f"SELECT {COLUMNS} FROM ferry_sagas WHERE id = ?", (migration_id,)
            )
        return _row_to_record(row) if row else None

    async def add_spans(self, migration_id: str, spans: builtins.list[dict[str, Any]]) -> None:
        if not spans:
            return
        async with self._write():
            await self._conn.executemany(
                "INSERT INTO ferry_saga_spans (migration_id, body) VALUES (?, ?)",
                [(migration_id, orjson.dumps(s).decode()) for s in spans],
            )

    async def spans(self, migration_id: str) -> builtins.list[dict[str, Any]]:
        async with self._lock:
            rows = await self._fetchall(
                "SELECT body FROM ferry_saga_spans WHERE migration_id = ? ORDER BY seq",
                (migration_id,),
            )
        return [orjson.loads(r[0]) for r in rows]
