"""Ownership leases: only the host that owns a VM's management plane dispatches its events."""

from __future__ import annotations

import asyncio

import pytest

from ferry_common.bus.topology import host_command
from ferry_common.messages.commands import ActivateVmEvents
from ferry_coordinator.timeouts import SagaTimeouts
from tests.harness import Cluster, inspect_problems, make_cluster, until

TIMEOUTS = SagaTimeouts(reply_s=1.0, attempts=2, status_poll_s=0.3, forward_retry_s=0.05,
                        forward_retry_max_s=0.3, lease_s=2.0, ownership_lease_s=1.0)


@pytest.fixture
async def cluster(bus_kind: str):
    c = await make_cluster(bus_kind, ("host-a", "host-b"), timeouts=TIMEOUTS)
    for h in c.hosts.values():
        h.sensor.leases.ttl_s = TIMEOUTS.ownership_lease_s
    yield c
    await c.close()


async def test_old_owner_that_wakes_up_active_cannot_dispatch(cluster: Cluster) -> None:
    c = cluster
    await c.create_vm("host-a", "vm1", memory_mib=256)
    await c.send_events("vm1", 10)
    assert (await c.migrate("vm1", "host-b")).status == "completed"
    before = list(c.host("host-a").managed_object.ledger["vm1"])
    # a stale or forged command makes host-a take the VM's events again, as if it missed
    # the whole migration: it holds what arrives, asks for the lease, is refused, lets go
    await c.client.endpoint.request(host_command("host-a", "sensor"), ActivateVmEvents(vm_id="vm1"), timeout=5)
    await c.send_events("vm1", 10)

    async def let_go() -> bool:
        return "vm1" not in c.host("host-a").sensor.vms
    await until(let_go, 10, "host-a to be fenced off")
    assert c.host("host-a").managed_object.ledger["vm1"] == before  # nothing dispatched there
    assert await inspect_problems(c, "vm1", "host-b") == []


async def test_without_the_coordinator_events_are_held_not_lost(cluster: Cluster) -> None:
    c = cluster
    await c.create_vm("host-a", "vm1", memory_mib=256)
    await c.send_events("vm1", 5)
    await c.settle("vm1")
    await c.coordinator.stop()
    await asyncio.sleep(TIMEOUTS.ownership_lease_s * 1.5)  # the lease runs out
    await c.send_events("vm1", 10)
    await asyncio.sleep(0.3)
    sensor = c.host("host-a").sensor
    assert sensor.vms["vm1"].queued == 10  # held, durably, in order
    await c.coordinator.start()
    await c.settle("vm1")
    assert await inspect_problems(c, "vm1", "host-a") == []
