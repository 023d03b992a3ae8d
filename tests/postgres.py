"""The test PostgreSQL (``FERRY_TEST_POSTGRES_URL``): a schema of its own per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

PG = os.environ.get("FERRY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@asynccontextmanager
async def fresh_schema(prefix: str) -> AsyncIterator[str]:
    """The store URL of a new schema ``<prefix>_<random>``, dropped on the way out (close
    the stores on it first)."""
    schema = f"{prefix}_{uuid.uuid4().hex[:8]}"
    try:
        yield f"{PG}?schema={schema}"
    finally:
        import asyncpg

        conn = await asyncpg.connect(PG)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
