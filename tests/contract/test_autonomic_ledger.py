"""The balancer's ledger row on every saga store backend: one lease holder at a time, and a
write from a holder that lost the lease (or raced another writer) changes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ferry_coordinator.autonomic.ledger import Ledger, acquire
from ferry_coordinator.store import MemorySagaStore, SagaStore
from tests.postgres import fresh_schema


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[SagaStore, SagaStore]]:
    """Two stores on the same data, as two coordinator replicas have."""
    if request.param == "memory":
        one = MemorySagaStore()
        yield one, one
        return
    if request.param == "sqlite":
        from ferry_coordinator.store.sqlite import SqliteSagaStore

        url = f"sqlite:///{tmp_path / 'saga.db'}"
        a, b = await SqliteSagaStore.open(url), await SqliteSagaStore.open(url)
        yield a, b
        await a.close()
        await b.close()
        return
    from ferry_coordinator.store.postgres import PostgresSagaStore

    async with fresh_schema("ferry_ledger") as url:
        a, b = await PostgresSagaStore.open(url), await PostgresSagaStore.open(url)
        yield a, b
        await a.close()
        await b.close()


async def test_one_holder_at_a_time_and_a_stale_write_is_refused(stores: tuple[SagaStore, SagaStore]) -> None:
    a: Ledger = stores[0].balancer
    b: Ledger = stores[1].balancer
    held = await acquire(a, "r1", now=100.0, lease_s=10.0)
    assert held is not None and held.owner == "r1"
    assert await acquire(b, "r2", now=105.0, lease_s=10.0) is None  # r1 holds it
    renewed = await acquire(a, "r1", now=106.0, lease_s=10.0)
    assert renewed is not None and renewed.lease_until == 116.0
    # r1 stalls mid-round with its copy; the lease runs out and r2 takes over
    taken = await acquire(b, "r2", now=117.0, lease_s=10.0)
    assert taken is not None and taken.owner == "r2"
    renewed.body["balancer"] = {"moved_at": {"vm1": 106.0}}
    assert not await a.write(renewed, expect=renewed.version)  # that version is gone
    taken.body["balancer"] = {"moved_at": {"vm2": 117.0}}
    assert await b.write(taken, expect=taken.version)
    now = await a.read()
    assert now.owner == "r2" and now.body["balancer"] == {"moved_at": {"vm2": 117.0}}
