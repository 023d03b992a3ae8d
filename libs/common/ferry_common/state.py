"""Durable local state for host services.

A host service must keep some things across its own restart: staged imports, frozen event
queues, reservations, and the results of requests it already answered (so a replayed request
gets the same answer). This is a small namespaced key-value store for that: values are
anything JSON can hold, keys are strings, and ``items(ns)`` lists a namespace sorted by key
(code-point order), so a queue should use zero-padded sequence numbers as keys.

Two backends: :class:`MemoryStateStore` (tests, demo) and :class:`SqliteStateStore` (one
SQLite file per service). :func:`open_state_store` picks one from a URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterable
from typing import Any, Protocol
from urllib.parse import parse_qsl

import aiosqlite
import orjson

__all__ = [
    "MemoryStateStore",
    "SqliteStateStore",
    "StateStore",
    "immediate_transaction",
    "open_state_store",
    "sqlite_path_from_url",
]


def _encode(value: Any) -> bytes:
    # orjson rejects what JSON cannot hold (sets, objects, non-str keys) right here, at put
    # time, instead of the value coming back changed after a restart.
    return orjson.dumps(value)


class StateStore(Protocol):
    """A namespaced key-value store of JSON values; every backend passes ``state_suite.py``."""

    async def get(self, ns: str, key: str) -> Any | None:
        """The value stored under ``key``, or None if there is none."""

    async def put(self, ns: str, key: str, value: Any) -> None:
        """Store ``value`` (JSON-able) under ``key``, replacing what was there."""

    async def put_many(self, ns: str, items: Iterable[tuple[str, Any]]) -> None:
        """Store several values at once: all of them or, on error, none."""

    async def write(self, puts: Iterable[tuple[str, str, Any]], deletes: Iterable[tuple[str, str]] = ()) -> None:
        """Store ``(ns, key, value)`` rows and forget ``(ns, key)`` rows across namespaces, as one
        change: after a crash either all of it is there or none of it."""

    async def delete(self, ns: str, key: str) -> None:
        """Forget ``key``; nothing happens if it is absent."""

    async def items(self, ns: str) -> list[tuple[str, Any]]:
        """Every ``(key, value)`` of ``ns``, sorted by key."""

    async def clear(self, ns: str) -> None:
        """Forget the whole namespace (a drained queue) in one go."""

    async def delete_through(self, ns: str, key: str) -> None:
        """Forget every key up to and including ``key`` (the drained head of a queue)."""

    async def close(self) -> None: ...


class MemoryStateStore:
    """The in-process :class:`StateStore`: forgets everything on restart."""

    def __init__(self) -> None:
        # Values are held encoded, so callers can neither mutate what is stored nor store
        # something the durable backend would refuse.
        self._data: dict[str, dict[str, bytes]] = {}

    async def get(self, ns: str, key: str) -> Any | None:
        raw = self._data.get(ns, {}).get(key)
        return None if raw is None else orjson.loads(raw)

    async def put(self, ns: str, key: str, value: Any) -> None:
        self._data.setdefault(ns, {})[key] = _encode(value)

    async def put_many(self, ns: str, items: Iterable[tuple[str, Any]]) -> None:
        encoded = {k: _encode(v) for k, v in items}  # encode all first: all or nothing
        self._data.setdefault(ns, {}).update(encoded)

    async def write(self, puts: Iterable[tuple[str, str, Any]], deletes: Iterable[tuple[str, str]] = ()) -> None:
        encoded = [(ns, k, _encode(v)) for ns, k, v in puts]  # encode all first: all or nothing
        for ns, k, raw in encoded:
            self._data.setdefault(ns, {})[k] = raw
        for ns, k in deletes:
            self._data.get(ns, {}).pop(k, None)

    async def delete(self, ns: str, key: str) -> None:
        self._data.get(ns, {}).pop(key, None)

    async def items(self, ns: str) -> list[tuple[str, Any]]:
        return [(k, orjson.loads(v)) for k, v in sorted(self._data.get(ns, {}).items())]

    async def clear(self, ns: str) -> None:
        self._data.pop(ns, None)

    async def delete_through(self, ns: str, key: str) -> None:
        space = self._data.get(ns, {})
        for k in [k for k in space if k <= key]:
            del space[k]

    async def close(self) -> None:
        return None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS ferry_state (
    ns    TEXT NOT NULL,
    key   TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (ns, key)
) WITHOUT ROWID;
"""


@contextlib.asynccontextmanager
async def immediate_transaction(conn: aiosqlite.Connection, lock: asyncio.Lock) -> AsyncIterator[None]:
    """One write transaction on ``conn``, holding SQLite's write lock from its first statement.

    ``BEGIN IMMEDIATE`` rather than a deferred BEGIN: a deferred transaction that reads and
    then writes can fail with SQLITE_BUSY_SNAPSHOT when another process wrote in between,
    which the busy timeout does not retry.
    """
    async with lock:
        try:
            await conn.execute("BEGIN IMMEDIATE")
            yield
            await conn.execute("COMMIT")
        except BaseException:
            # aiosqlite runs a statement even when the task awaiting it was cancelled, so a
            # cancelled BEGIN still opens a transaction: the ROLLBACK, queued behind it on the
            # same worker, closes it before anything else runs on the connection (after a
            # COMMIT that did run, it finds nothing to undo). Shielded, so that a second
            # cancellation cannot leave the connection inside a transaction.
            with contextlib.suppress(Exception):
                await asyncio.shield(conn.execute("ROLLBACK"))
            raise


class SqliteStateStore:
    """A :class:`StateStore` on one SQLite file (WAL mode).

    ``synchronous`` is SQLite's pragma: ``full`` (default) survives power loss, ``normal``
    survives a crash of the process but may lose the last commits on power loss, in exchange
    for no fsync per commit.
    """

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn
        # The connection is shared; a coroutine's statement must not land inside another's
        # open transaction.
        self._lock = asyncio.Lock()

    @classmethod
    async def open(
        cls, path: str | os.PathLike[str], *, synchronous: str = "full"
    ) -> SqliteStateStore:
        """Open (creating if needed) the store in the file ``path`` (or ``:memory:``)."""
        if synchronous.lower() not in {"off", "normal", "full", "extra"}:
            raise ValueError(f"unknown synchronous mode {synchronous!r}")
        conn = await aiosqlite.connect(os.fspath(path), isolation_level=None)
        try:
            await conn.execute("PRAGMA busy_timeout = 10000")
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            # 16 MiB of page cache (default 2 MiB): a 100k-event batch then stays in memory
            # until its single commit instead of spilling B-tree pages mid-transaction.
            await conn.execute("PRAGMA cache_size = -16384")
            await conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}COMMIT;")
        except BaseException:
            await conn.close()
            raise
        return cls(conn)

    def _write(self) -> contextlib.AbstractAsyncContextManager[None]:
        return immediate_transaction(self._conn, self._lock)

    async def get(self, ns: str, key: str) -> Any | None:
        async with self._lock:
            async with self._conn.execute(
                "SELECT value FROM ferry_state WHERE ns = ? AND key = ?", (ns, key)
            ) as cur:
                row = await cur.fetchone()
        return None if row is None else orjson.loads(row[0])

    async def put(self, ns: str, key: str, value: Any) -> None:
        raw = _encode(value)
        async with self._lock:
            # A single statement commits atomically on its own; no explicit transaction needed.
            await self._conn.execute(
                "INSERT INTO ferry_state (ns, key, value) VALUES (?, ?, ?) "
                "ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value",
                (ns, key, raw),
            )

    async def put_many(self, ns: str, items: Iterable[tuple[str, Any]]) -> None:
        # Encode before taking the lock, and in one transaction: one fsync for the whole batch
        # is what makes 100k small items take milliseconds rather than minutes.
        rows = [(ns, key, _encode(value)) for key, value in items]
        if not rows:
            return
        async with self._write():
            await self._conn.executemany(
                "INSERT INTO ferry_state (ns, key, value) VALUES (?, ?, ?) "
                "ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value",
                rows,
            )

    async def write(self, puts: Iterable[tuple[str, str, Any]], deletes: Iterable[tuple[str, str]] = ()) -> None:
        rows = [(ns, key, _encode(value)) for ns, key, value in puts]
        gone = list(deletes)
        if not rows and not gone:
            return
        async with self._write():
            if rows:
                await self._conn.executemany(
                    "INSERT INTO ferry_state (ns, key, value) VALUES (?, ?, ?) "
                    "ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value",
                    rows,
                )
            if gone:
                await self._conn.executemany("DELETE FROM ferry_state WHERE ns = ? AND key = ?", gone)

    async def delete(self, ns: str, key: str) -> None:
        async with self._lock:
            await self._conn.execute("DELETE FROM ferry_state WHERE ns = ? AND key = ?", (ns, key))

    async def items(self, ns: str) -> list[tuple[str, Any]]:
        async with self._lock:
            async with self._conn.execute(
                "SELECT key, value FROM ferry_state WHERE ns = ? ORDER BY key", (ns,)
            ) as cur:
                rows = await cur.fetchall()
        return [(key, orjson.loads(value)) for key, value in rows]

    async def clear(self, ns: str) -> None:
        async with self._lock:
            await self._conn.execute("DELETE FROM ferry_state WHERE ns = ?", (ns,))

    async def delete_through(self, ns: str, key: str) -> None:
        async with self._lock:
            await self._conn.execute("DELETE FROM ferry_state WHERE ns = ? AND key <= ?", (ns, key))

    async def close(self) -> None:
        async with self._lock:
            await self._conn.close()


def sqlite_path_from_url(url: str) -> tuple[str, dict[str, str]]:
    """Split ``sqlite:///path?opt=v`` into the file path and its options.

    SQLAlchemy's convention: three slashes then a relative path (``sqlite:///state.db``), four
    for an absolute one (``sqlite:////var/lib/ferry/state.db``); ``sqlite:///:memory:`` too.
    """
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        raise ValueError(f"not a sqlite URL (expected {prefix}path): {url!r}")
    path, _, query = url[len(prefix) :].partition("?")
    if not path:
        raise ValueError(f"sqlite URL without a path: {url!r}")
    return path, dict(parse_qsl(query))


async def open_state_store(url: str) -> StateStore:
    """``memory://`` or ``sqlite:///path.db`` (optionally ``?synchronous=normal``)."""
    if url.startswith("memory:"):
        return MemoryStateStore()
    if url.startswith("sqlite:"):
        path, options = sqlite_path_from_url(url)
        return await SqliteStateStore.open(path, synchronous=options.get("synchronous", "full"))
    raise ValueError(f"unsupported state store URL {url!r}")
