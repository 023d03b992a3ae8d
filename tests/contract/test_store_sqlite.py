"""The SQLite saga store against the store contract, plus what only a file can show."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ferry_coordinator.store import open_store
from ferry_coordinator.store.sqlite import SqliteSagaStore

from .store_suite import MakeStore, SagaStoreSuite, handles, saga


class TestSqliteSagaStore(SagaStoreSuite):
    @pytest.fixture
    async def make_store(self, tmp_path: Path) -> AsyncIterator[MakeStore]:
        # Each handle is its own connection to one file, like coordinators sharing a disk.
        async with handles(f"sqlite:///{tmp_path / 'sagas.db'}") as make:
            yield make


async def test_sagas_survive_reopening(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sagas.db'}"
    store = await SqliteSagaStore.open(url)
    rec, _ = await store.create(saga())
    rec.step = "transfer"
    await store.save(rec, owner=None)
    await store.add_spans("m-1", [{"name": "admission"}])
    await store.close()

    store = await SqliteSagaStore.open(url)
    try:
        fetched = await store.get("m-1")
        assert fetched is not None and fetched.step == "transfer" and fetched.version == 2
        assert await store.spans("m-1") == [{"name": "admission"}]
        # the one-active-saga index survived too
        _, created = await store.create(saga("m-2", "vm-1"))
        assert created is False
    finally:
        await store.close()


async def test_in_memory_url(tmp_path: Path) -> None:
    store = await open_store("sqlite:///:memory:")
    try:
        _, created = await store.create(saga())
        assert created is True
        assert not any(tmp_path.iterdir())  # noqa: ASYNC240 - a tmp dir listing in a test
    finally:
        await store.close()


async def test_wal_mode(tmp_path: Path) -> None:
    store = await SqliteSagaStore.open(f"sqlite:///{tmp_path / 'sagas.db'}")
    try:
        async with store._conn.execute("PRAGMA journal_mode") as cur:
            row = await cur.fetchone()
        assert row is not None and row[0] == "wal"
    finally:
        await store.close()
