"""The in-process host state store against the state contract."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ferry_common.state import MemoryStateStore, StateStore, open_state_store

from .state_suite import StateStoreSuite


class TestMemoryStateStore(StateStoreSuite):
    @pytest.fixture
    async def state(self) -> AsyncIterator[StateStore]:
        store = await open_state_store("memory://")
        assert isinstance(store, MemoryStateStore)
        yield store
        await store.close()
