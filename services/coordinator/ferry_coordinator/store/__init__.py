"""Where the coordinator keeps sagas: one interface, several backends."""

from .base import TERMINAL, HistoryEntry, SagaRecord, SagaStore
from .memory import MemorySagaStore

__all__ = ["HistoryEntry", "SagaRecord", "SagaStore", "TERMINAL", "MemorySagaStore", "open_store"]


async def open_store(url: str) -> SagaStore:
    """``memory://``, ``sqlite:///path.db`` or ``postgresql://...``."""
    if url.startswith("memory:"):
        return MemorySagaStore()
    if url.startswith("sqlite:"):
        from .sqlite import SqliteSagaStore

        store: SagaStore = await SqliteSagaStore.open(url)
        return store
    if url.startswith(("postgres://", "postgresql://")):
        from .postgres import PostgresSagaStore

        store = await PostgresSagaStore.open(url)
        return store
    raise ValueError(f"unsupported store URL {url!r}")
