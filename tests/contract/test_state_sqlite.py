"""The SQLite host state store against the state contract, plus durability."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ferry_common.state import SqliteStateStore, StateStore, open_state_store

from .state_suite import StateStoreSuite


class TestSqliteStateStore(StateStoreSuite):
    @pytest.fixture
    async def state(self, tmp_path: Path) -> AsyncIterator[StateStore]:
        store = await open_state_store(f"sqlite:///{tmp_path / 'state.db'}")
        assert isinstance(store, SqliteStateStore)
        yield store
        await store.close()


async def test_state_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = await SqliteStateStore.open(path)
    await store.put("imports", "vm-1", {"staged": True, "bytes": 123})
    await store.put_many("frozen", [(f"{i:06d}", {"seq": i}) for i in range(1000)])
    await store.put("reservations", "r-1", {"cpu": 4})
    await store.delete("reservations", "r-1")
    await store.close()

    store = await SqliteStateStore.open(path)
    try:
        assert await store.get("imports", "vm-1") == {"staged": True, "bytes": 123}
        frozen = await store.items("frozen")
        assert [v["seq"] for _, v in frozen] == list(range(1000))
        assert await store.get("reservations", "r-1") is None
    finally:
        await store.close()


async def test_open_state_store_url_options(tmp_path: Path) -> None:
    store = await open_state_store(f"sqlite:///{tmp_path / 's.db'}?synchronous=normal")
    try:
        await store.put("ns", "k", 1)
        assert await store.get("ns", "k") == 1
    finally:
        await store.close()
    with pytest.raises(ValueError):
        await open_state_store(f"sqlite:///{tmp_path / 's.db'}?synchronous=bogus")
    with pytest.raises(ValueError):
        await open_state_store("redis://nope")


async def test_in_memory_path() -> None:
    store = await open_state_store("sqlite:///:memory:")
    try:
        await store.put("ns", "k", [1])
        assert await store.items("ns") == [("k", [1])]
    finally:
        await store.close()


async def test_put_many_100k_in_one_batch(tmp_path: Path) -> None:
    """A frozen queue of 100,000 events goes in as one batch and comes back whole, in order
    (how fast is for bench/, not for a test)."""
    store = await SqliteStateStore.open(tmp_path / "state.db")
    try:
        events = [(f"{i:08d}", {"type": "vm.event", "seq": i, "vm": "vm-1"}) for i in range(100_000)]
        await store.put_many("frozen", events)
        got = await store.items("frozen")
        assert [v["seq"] for _, v in got] == list(range(100_000))
    finally:
        await store.close()
