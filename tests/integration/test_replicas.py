"""Several coordinator replicas on one PostgreSQL saga store: each saga is driven by one
replica at a time, a cancel reaches the saga whichever replica takes it, and when a
replica dies the others take its sagas over."""

from __future__ import annotations

import asyncio

import pytest

from ferry_cli.cluster import build_coordinator
from ferry_coordinator.service import CoordinatorService
from ferry_coordinator.store.postgres import PostgresSagaStore
from ferry_coordinator.timeouts import SagaTimeouts
from tests.harness import Cluster, inspect_problems, make_cluster, new_bus, until
from tests.postgres import fresh_schema

TIMEOUTS = SagaTimeouts(reply_s=2.0, attempts=2, status_poll_s=0.3, forward_retry_s=0.05,
                        forward_retry_max_s=0.3, lease_s=2.0)
pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]


@pytest.fixture
async def replicas(rabbitmq_available: None):
    async with fresh_schema("ferry_replicas") as url:
        store = await PostgresSagaStore.open(url)
        c = await make_cluster("rabbitmq", ("host-a", "host-b", "host-c"), timeouts=TIMEOUTS, store=store)
        others: list[CoordinatorService] = []
        for _ in range(2):
            other_store = await PostgresSagaStore.open(url)
            bus = await new_bus("rabbitmq", c.vhost)
            c.buses.append(bus)
            replica = build_coordinator(bus, other_store, clock=c.clock, timeouts=TIMEOUTS)
            await replica.start()
            others.append(replica)

        async def known() -> bool:
            return all(r.hosts.known(h) for r in others for h in c.hosts)
        await until(known, 10, "every replica to know every host")
        c.replicas = [c.coordinator, *others]  # type: ignore[attr-defined]
        yield c
        for r in others:
            await r.stop()
            await r.store.close()
        await c.close()
        await store.close()


async def test_sagas_spread_over_replicas_each_driven_by_one(replicas: Cluster) -> None:
    c = replicas
    vms = [f"vm{i}" for i in range(9)]
    for i, vm in enumerate(vms):
        await c.create_vm(f"host-{'abc'[i % 3]}", vm, memory_mib=128, sim_instant=True)
    for r in c.replicas:  # type: ignore[attr-defined]
        await until(lambda r=r: _knows(r, vms), 10, "inventory")
    mids = [await c.client.migrate(vm, f"host-{'abc'[(i + 1) % 3]}") for i, vm in enumerate(vms)]
    outcomes = await asyncio.gather(*(c.client.outcome(m, timeout=60) for m in mids))
    assert [o.status for o in outcomes] == ["completed"] * len(vms)
    owners = set()
    for mid in mids:
        rec = await c.store.get(mid)
        assert rec is not None
        owners.add(rec.owner)
    assert len(owners) > 1  # the work was shared
    for i, vm in enumerate(vms):
        assert await inspect_problems(c, vm, f"host-{'abc'[(i + 1) % 3]}") == []


async def _knows(r: CoordinatorService, vms: list[str]) -> bool:
    return all(r.hosts.locate(v) is not None for v in vms)


async def test_a_replica_dies_and_another_finishes_its_saga(replicas: Cluster) -> None:
    c = replicas
    await c.create_vm("host-a", "vm1", memory_mib=2048, sim_bandwidth_mibps=1024)  # ~2 s
    await c.send_events("vm1", 10)
    for r in c.replicas:  # type: ignore[attr-defined]
        await until(lambda r=r: _knows(r, ["vm1"]), 10, "inventory")
    mid = await c.client.migrate("vm1", "host-b")

    async def driven() -> bool:
        return any(mid in r.running for r in c.replicas)  # type: ignore[attr-defined]
    await until(driven, 10, "a replica to drive the saga")
    driver = next(r for r in c.replicas if mid in r.running)  # type: ignore[attr-defined]
    for task in list(driver.running.values()):
        task.cancel()  # kill -9: nothing more from this replica
    await driver.stop()
    outcome = await c.client.outcome(mid, timeout=60)
    assert outcome.status == "completed"
    rec = await c.store.get(mid)
    assert rec is not None and rec.owner != driver.owner
    await c.send_events("vm1", 5)
    assert await inspect_problems(c, "vm1", "host-b") == []


async def test_cancel_taken_by_any_replica_reaches_the_saga(replicas: Cluster) -> None:
    c = replicas
    await c.create_vm("host-a", "vm1", memory_mib=8192, sim_bandwidth_mibps=1024)  # ~8 s
    for r in c.replicas:  # type: ignore[attr-defined]
        await until(lambda r=r: _knows(r, ["vm1"]), 10, "inventory")
    mid = await c.client.migrate("vm1", "host-b")
    async for event in c.client.follow(mid, timeout=30):
        if event.step == "migrate_vm":
            break
    for _ in range(3):  # whichever replica takes each cancel
        await c.client.cancel(mid)
    outcome = await c.client.outcome(mid, timeout=30)
    assert (outcome.status, outcome.code) == ("rolled_back", "cancelled")
    assert await inspect_problems(c, "vm1", "host-a") == []
