"""The PostgreSQL saga store: durable sagas shared by several coordinator replicas.

``postgresql://user@host:5432/db?schema=ferry`` puts the tables in schema ``ferry`` (created
if absent); without ``schema`` they go wherever the server's ``search_path`` points
(normally ``public``). Other query parameters are passed on to asyncpg.

Atomicity is the server's: a partial unique index keeps one active saga per VM, saves are a
guarded ``UPDATE``, and ``claim`` locks rows with ``FOR UPDATE SKIP LOCKED`` so replicas
claiming together split the work instead of queueing behind each other.
"""

from __future__ import annotations

# builtins.list in annotations: inside the class, ``list`` is the store's own method.
import builtins
import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import orjson

from ferry_common.errors import Conflict

from .base import SagaRecord
from .columns import COLUMNS, TERMINAL_SQL, blob, record_from
from .drains_postgres import SCHEMA as DRAINS_SCHEMA
from .drains_postgres import PostgresDrainStore
from .ledger import PostgresLedger
from .queue_postgres import PostgresFleetQueue, create_schema, releasing

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS ferry_sagas (
    id               TEXT PRIMARY KEY,
    vm_id            TEXT NOT NULL,
    status           TEXT NOT NULL,
    owner            TEXT,
    lease_until      DOUBLE PRECISION NOT NULL DEFAULT 0,
    version          BIGINT NOT NULL,
    created_at       DOUBLE PRECISION NOT NULL,
    updated_at       DOUBLE PRECISION NOT NULL,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    body             JSONB NOT NULL
);
-- the partial indexes name the terminal set they were made for (v2: with failed); older
-- ones would keep a failed saga's VM busy forever
DROP INDEX IF EXISTS ferry_sagas_one_active_per_vm;
CREATE UNIQUE INDEX IF NOT EXISTS ferry_sagas_one_active_per_vm_v2
    ON ferry_sagas (vm_id) WHERE status NOT IN {TERMINAL_SQL};
CREATE INDEX IF NOT EXISTS ferry_sagas_vm_created ON ferry_sagas (vm_id, created_at);
CREATE INDEX IF NOT EXISTS ferry_sagas_created ON ferry_sagas (created_at);
DROP INDEX IF EXISTS ferry_sagas_claimable;
CREATE INDEX IF NOT EXISTS ferry_sagas_claimable_v2 ON ferry_sagas (created_at)
    WHERE status NOT IN {TERMINAL_SQL};
CREATE TABLE IF NOT EXISTS ferry_saga_spans (
    seq          BIGSERIAL PRIMARY KEY,
    migration_id TEXT NOT NULL,
    body         JSONB NOT NULL
);
CREATE INDEX IF NOT EXISTS ferry_saga_spans_by_migration ON ferry_saga_spans (migration_id, seq);
"""

# Any constant works; it only has to be the same for every replica creating the schema, since
# concurrent CREATE ... IF NOT EXISTS can still collide on the catalog's unique indexes.
_SCHEMA_LOCK = 0x0FE77_5A6A

_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def _body(record: SagaRecord) -> dict[str, Any]:
    return blob(record)


def _row_to_record(row: asyncpg.Record) -> SagaRecord:
    return record_from(row, row["body"])


async def _init_connection(conn: asyncpg.Connection) -> None:
    # orjson both ways: JSONB in, dicts out, without a json.dumps per call site.
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda v: orjson.dumps(v).decode(),
        decoder=orjson.loads,
        format="text",
    )


def _split_url(url: str) -> tuple[str, str | None]:
    """Take our own ``schema`` parameter off the URL; asyncpg would reject it."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = next((v for k, v in query if k == "schema"), None)
    rest = urlencode([(k, v) for k, v in query if k != "schema"])
    if schema is not None and not _SCHEMA_NAME.match(schema):
        raise ValueError(f"invalid schema name {schema!r}")
    return urlunsplit(parts._replace(query=rest)), schema


class PostgresSagaStore:
    """A :class:`~ferry_coordinator.store.base.SagaStore` on PostgreSQL (asyncpg pool)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.queue = PostgresFleetQueue(pool)
        self.drains = PostgresDrainStore(pool)
        self.balancer = PostgresLedger(pool)

    @classmethod
    async def open(
        cls, url: str, *, min_size: int = 1, max_size: int = 10, connect_timeout: float = 10.0
    ) -> PostgresSagaStore:
        """Connect and create the schema and tables if they are absent."""
        dsn, schema = _split_url(url)
        if schema is not None:
            # Create the schema on a plain connection first: the pool's connections set
            # search_path to it, which must exist before the tables are created inside it.
            conn = await asyncpg.connect(dsn, timeout=connect_timeout)
            try:
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
                    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            finally:
                await conn.close()
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=connect_timeout,
            init=_init_connection,
            server_settings={"search_path": f'"{schema}"'} if schema else None,
        )
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
                await conn.execute(_SCHEMA)
                await create_schema(conn)
                await conn.execute(DRAINS_SCHEMA)
        except BaseException:
            await pool.close()
            raise
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    async def create(self, record: SagaRecord) -> tuple[SagaRecord, bool]:
        async with self._pool.acquire() as conn:
            # The loop covers a race the insert cannot see: the saga that blocked us may finish
            # (turn terminal) before we read it, in which case we simply try again.
            for _ in range(10):
                # No conflict target: DO NOTHING covers the primary key (same id) and the
                # partial unique index (another active saga for the VM). A concurrent insert
                # for the same VM waits for the other transaction and then does nothing.
                # A record that is terminal already frees its queue slot in the same statement.
                row = await conn.fetchrow(
                    releasing(
                        f"INSERT INTO ferry_sagas ({COLUMNS}) "
                        "VALUES ($1,$2,$3,$4,$5,1,$6,$7,$8,$9) "
                        f"ON CONFLICT DO NOTHING RETURNING {COLUMNS}",
                        mid="$1", status="$3", at="$7",
                    ),
                    record.migration_id,
                    record.vm_id,
                    record.status,
                    record.owner,
                    record.lease_until,
                    record.created_at,
                    record.updated_at,
                    record.cancel_requested,
                    _body(record),
                )
                if row is not None:
                    return _row_to_record(row), True
                # Same id first: a replayed create must get its own saga back.
                row = await conn.fetchrow(
                    f"SELECT {COLUMNS} FROM ferry_sagas "
                    f"WHERE id = $1 OR (vm_id = $2 AND status NOT IN {TERMINAL_SQL}) "
                    "ORDER BY (id = $1) DESC LIMIT 1",
                    record.migration_id,
                    record.vm_id,
                )
                if row is not None:
                    return _row_to_record(row), False
        raise Conflict(f"saga {record.migration_id}: VM {record.vm_id} is too contended")

    async def get(self, migration_id: str) -> SagaRecord | None:
        row = await self._pool.fetchrow(
            f"SELECT {COLUMNS} FROM ferry_sagas WHERE id = $1", migration_id
        )
        return _row_to_record(row) if row else None

    async def save(self, record: SagaRecord, *, owner: str | None) -> SagaRecord:
        async with self._pool.acquire() as conn:
            try:
                # owner/lease_until are never written here (only claim/renew move a lease);
                # cancel_requested is OR-ed so a concurrent request_cancel is not lost.
                # A saga saved as ended frees its queue slot in the same statement.
                row = await conn.fetchrow(
                    releasing(
                        "UPDATE ferry_sagas SET vm_id = $2, status = $3, version = version + 1, "
                        "created_at = $4, updated_at = $5, "
                        "cancel_requested = (cancel_requested OR $6), body = $7 "
                        "WHERE id = $1 AND version = $8 "
                        "AND (owner IS NULL OR $9::text IS NULL OR owner = $9::text) "
                        f"RETURNING {COLUMNS}",
                        mid="$1", status="$3", at="$5",
                    ),
                    record.migration_id,
                    record.vm_id,
                    record.status,
                    record.created_at,
                    record.updated_at,
                    record.cancel_requested,
                    _body(record),
                    record.version,
                    owner,
                )
            except asyncpg.UniqueViolationError as exc:
                # Re-activating a finished saga while another one runs for the VM.
                raise Conflict(
                    f"saga {record.migration_id}: VM {record.vm_id} has another active saga"
                ) from exc
            if row is not None:
                return _row_to_record(row)
            current = await conn.fetchrow(
                "SELECT version, owner FROM ferry_sagas WHERE id = $1", record.migration_id
            )
        # Read after the failed update, so only for the message; the decision was the UPDATE's.
        if current is None:
            raise Conflict(f"saga {record.migration_id} does not exist")
        if current["version"] != record.version:
            raise Conflict(
                f"saga {record.migration_id} changed "
                f"(version {current['version']}, not {record.version})"
            )
        raise Conflict(f"saga {record.migration_id} is driven by {current['owner']}")

    async def list(self, *, vm_id: str | None = None, limit: int = 50) -> builtins.list[SagaRecord]:
        rows = await self._pool.fetch(
            f"SELECT {COLUMNS} FROM ferry_sagas WHERE ($1::text IS NULL OR vm_id = $1::text) "
            "ORDER BY created_at DESC, id DESC LIMIT $2",
            vm_id,
            limit,
        )
        return [_row_to_record(r) for r in rows]

    async def active_for_vm(self, vm_id: str) -> SagaRecord | None:
        row = await self._pool.fetchrow(
            f"SELECT {COLUMNS} FROM ferry_sagas "
            f"WHERE vm_id = $1 AND status NOT IN {TERMINAL_SQL}",
            vm_id,
        )
        return _row_to_record(row) if row else None

    async def claim(
        self, owner: str, *, now: float, lease_s: float, limit: int = 100
    ) -> builtins.list[SagaRecord]:
        # SKIP LOCKED: rows another replica is claiming or saving right now are left to it
        # rather than waited for. The version bump fences out any replica still holding a copy
        # from before it lost the lease: its next save conflicts.
        rows = await self._pool.fetch(
            "WITH picked AS ("
            "  SELECT id FROM ferry_sagas "
            f"  WHERE status NOT IN {TERMINAL_SQL} "
            "   AND (owner IS NULL OR lease_until < $2) "
            "  ORDER BY created_at, id LIMIT $4 FOR UPDATE SKIP LOCKED) "
            "UPDATE ferry_sagas s SET owner = $1, lease_until = $2 + $3, version = s.version + 1 "
            f"FROM picked WHERE s.id = picked.id RETURNING "
            + ", ".join(f"s.{c.strip()}" for c in COLUMNS.split(",")),
            owner,
            now,
            lease_s,
            limit,
        )
        records = [_row_to_record(r) for r in rows]
        records.sort(key=lambda r: (r.created_at, r.migration_id))  # RETURNING has no order
        return records

    async def renew(self, migration_id: str, owner: str, *, until: float) -> bool:
        row = await self._pool.fetchrow(
            "UPDATE ferry_sagas SET lease_until = $3 WHERE id = $1 AND owner = $2 RETURNING id",
            migration_id,
            owner,
            until,
        )
        return row is not None

    async def request_cancel(self, migration_id: str) -> SagaRecord | None:
        # No version bump: the driver's next save merges the flag instead of conflicting.
        row = await self._pool.fetchrow(
            "UPDATE ferry_sagas SET cancel_requested = TRUE "
            f"WHERE id = $1 AND status NOT IN {TERMINAL_SQL} RETURNING {COLUMNS}",
            migration_id,
        )
        if row is None:  # absent, or finished: nothing to cancel, report it as it is
            row = await self._pool.fetchrow(
                f"SELECT {COLUMNS} FROM ferry_sagas WHERE id = $1", migration_id
            )
        return _row_to_record(row) if row else None

    async def add_spans(self, migration_id: str, spans: builtins.list[dict[str, Any]]) -> None:
        if not spans:
            return
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                "INSERT INTO ferry_saga_spans (migration_id, body) VALUES ($1, $2)",
                [(migration_id, s) for s in spans],
            )

    async def spans(self, migration_id: str) -> builtins.list[dict[str, Any]]:
        rows = await self._pool.fetch(
            "SELECT body FROM ferry_saga_spans WHERE migration_id = $1 ORDER BY seq",
            migration_id,
        )
        return [r["body"] for r in rows]
