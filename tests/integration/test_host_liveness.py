"""Host liveness end to end: the hosts' inventories are their heartbeats at the coordinator."""

from __future__ import annotations

import asyncio
import time

from ferry_cli.cluster import HostOptions
from ferry_common import metrics
from ferry_hypervisor_adapter.service import HypervisorAdapterService
from tests.harness import make_cluster, metric_sample

PERIOD = 0.2


async def test_a_host_whose_heartbeats_stop_is_not_ready_within_its_bound(bus_kind: str) -> None:
    options = {
        "host-a": HostOptions(inventory_interval_s=PERIOD, labels={"zone": "z1"}),
        "host-b": HostOptions(inventory_interval_s=PERIOD),
    }
    c = await make_cluster(bus_kind, ("host-a", "host-b"), options=options)
    try:
        tracker = c.coordinator.liveness
        assert tracker.ready("host-a") and tracker.ready("host-b")
        assert tracker.bound_s("host-b") == 3 * PERIOD  # the period the inventory states
        assert c.coordinator.hosts.hosts["host-a"].labels == {"zone": "z1"}
        # host-b's adapter stops announcing itself, as when its services are killed
        adapter = c.host("host-b").services["hypervisor_adapter"]
        assert isinstance(adapter, HypervisorAdapterService) and adapter._inventory_task is not None
        adapter._inventory_task.cancel()
        started = time.monotonic()
        await asyncio.wait_for(tracker.wait_not_ready("host-b"), 5.0)
        elapsed = time.monotonic() - started
        assert elapsed <= 3 * PERIOD + 1.5, elapsed  # the bound, and slack for the bus on a loaded machine
        assert tracker.ready("host-a")
        text = metrics.REGISTRY.render()
        assert metric_sample(text, "ferry_fleet_host_ready", '{host="host-b"}') == 0
        assert metric_sample(text, "ferry_fleet_host_ready", '{host="host-a"}') == 1
    finally:
        await c.close()
