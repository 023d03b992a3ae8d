"""A drain survives its coordinator killed mid-drain, with a second replica running and a new
coordinator started on the same store (PostgreSQL, real RabbitMQ): the drain finishes and no
VM is migrated twice. The coordinators' dispatchers start the queue's entries."""

from __future__ import annotations

from collections import Counter

import pytest

from ferry_coordinator.service import CoordinatorService
from ferry_coordinator.store.postgres import PostgresSagaStore
from ferry_coordinator.timeouts import SagaTimeouts
from tests.harness import check_invariants, make_cluster, until
from tests.postgres import fresh_schema

from .drain_scale_support import replica
from .drain_support import dispatcher, drain, fill, status, wait_end

TIMEOUTS = SagaTimeouts(reply_s=2.0, attempts=2, status_poll_s=0.3, forward_retry_s=0.05,
                        forward_retry_max_s=0.3, lease_s=2.0)
pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]


async def test_a_drain_survives_its_coordinator_killed(rabbitmq_available: None) -> None:
    async with fresh_schema("ferry_drain") as url:
        await _drain_survives_its_coordinator_killed(url)


async def _drain_survives_its_coordinator_killed(url: str) -> None:
    store = await PostgresSagaStore.open(url)
    c = await make_cluster("rabbitmq", ("host-a", "host-b", "host-c", "host-d"), timeouts=TIMEOUTS, store=store)
    extra: list[CoordinatorService] = []
    try:
        vms = await fill(c, "host-a", 10)
        for vm in vms[:2]:
            await c.send_events(vm, 5)
        extra.append(await replica(c, url, TIMEOUTS))  # a second replica, there all along
        async with dispatcher(c) as started:
            await drain(c, "host-a")

            async def some_done() -> bool:
                return (await status(c, "host-a")).done >= 3
            await until(some_done, 30, "three VMs to leave")
            old = c.coordinator
            for task in list(old.running.values()):
                task.cancel()  # as kill -9: its sagas and its drain passes stop where they are
            await old.stop()
            extra.append(await replica(c, url, TIMEOUTS))  # a new coordinator on the same store
            end = await wait_end(c, "host-a", timeout=90)
        assert (end.status, end.done, end.failed) == ("drained", 10, 0), end
        assert len(started) == len(set(started)) == 10  # no migration asked for twice
        completed: Counter[str] = Counter()
        for rec in await store.list(limit=1000):
            completed[rec.vm_id] += rec.status == "completed"
        assert all(completed[vm] == 1 for vm in vms), completed
        for vm in vms:
            loc = extra[-1].hosts.locate(vm)
            assert loc is not None and loc[0] != "host-a"
            await check_invariants(c, vm, loc[0])
    finally:
        for r in extra:
            await r.stop()
            await r.store.close()
        await c.close()
        await store.close()
