"""What the stores kept in the SQLite saga store's file share: its connection and lock, the
write transaction, and records read back from their JSON bodies."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import aiosqlite
import orjson

from ferry_common.state import immediate_transaction

T = TypeVar("T")


class SqliteRecords(Generic[T]):
    """Records of one kind, a JSON ``body`` column each, made by ``load``."""

    def __init__(self, conn: aiosqlite.Connection, lock: asyncio.Lock, load: Callable[[Any], T]) -> None:
        self._conn = conn
        self._lock = lock
        self._load = load

    def _write(self) -> contextlib.AbstractAsyncContextManager[None]:
        return immediate_transaction(self._conn, self._lock)

    async def _one(self, sql: str, params: tuple[Any, ...]) -> T | None:
        async with self._conn.execute(sql, params) as cur:
            row = await cur.fetchone()
        return self._load(orjson.loads(row[0])) if row else None

    async def _many(self, sql: str, params: tuple[Any, ...]) -> builtins.list[T]:
        async with self._conn.execute(sql, params) as cur:
            rows = await cur.fetchall()
        return [self._load(orjson.loads(r[0])) for r in rows]
