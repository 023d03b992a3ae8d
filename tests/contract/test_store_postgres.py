"""The PostgreSQL saga store against the store contract.

Needs the server (``FERRY_TEST_POSTGRES_URL``, default the local trust-auth one). These tests
fail rather than skip when it is unreachable: CI has it, and a silent skip would hide a broken
backend. Each test gets a schema of its own, dropped afterwards, so parallel runs don't clash.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from ferry_coordinator.store.postgres import PostgresSagaStore

from .store_suite import MakeStore, SagaStoreSuite, handles, saga

pytestmark = pytest.mark.postgres

POSTGRES_URL = os.environ.get(
    "FERRY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


def _with_schema(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"


@pytest.fixture
async def pg_schema() -> AsyncIterator[str]:
    schema = f"ferry_test_{uuid.uuid4().hex[:12]}"
    yield schema
    conn = await asyncpg.connect(POSTGRES_URL, timeout=10)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


class TestPostgresSagaStore(SagaStoreSuite):
    @pytest.fixture
    async def make_store(self, pg_schema: str) -> AsyncIterator[MakeStore]:
        # Each handle is its own pool, like two coordinator replicas.
        async with handles(_with_schema(POSTGRES_URL, pg_schema)) as make:
            yield make


async def test_sagas_survive_reopening(pg_schema: str) -> None:
    url = _with_schema(POSTGRES_URL, pg_schema)
    store = await PostgresSagaStore.open(url)
    rec, _ = await store.create(saga())
    rec.step = "transfer"
    await store.save(rec, owner=None)
    await store.close()
    store = await PostgresSagaStore.open(url)
    try:
        fetched = await store.get("m-1")
        assert fetched is not None and fetched.step == "transfer" and fetched.version == 2
    finally:
        await store.close()


async def test_schemas_are_isolated(pg_schema: str) -> None:
    other = f"{pg_schema}_b"
    a = await PostgresSagaStore.open(_with_schema(POSTGRES_URL, pg_schema))
    b = await PostgresSagaStore.open(_with_schema(POSTGRES_URL, other))
    try:
        await a.create(saga())
        assert await b.get("m-1") is None
    finally:
        await a.close()
        await b.close()
        conn = await asyncpg.connect(POSTGRES_URL, timeout=10)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{other}" CASCADE')
        finally:
            await conn.close()


async def test_rejects_a_bad_schema_name() -> None:
    with pytest.raises(ValueError):
        await PostgresSagaStore.open(_with_schema(POSTGRES_URL, 'x"; DROP TABLE y; --'))
