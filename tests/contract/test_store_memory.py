"""The in-process saga store against the store contract."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ferry_coordinator.store import MemorySagaStore, SagaStore

from .store_suite import MakeStore, SagaStoreSuite


class TestMemorySagaStore(SagaStoreSuite):
    @pytest.fixture
    async def make_store(self) -> AsyncIterator[MakeStore]:
        # One object is all the storage there is, so every "handle" is that object.
        store = MemorySagaStore()

        async def make() -> SagaStore:
            return store

        yield make
        await store.close()
