"""A request that comes before the hosts' inventories (a coordinator just restarted, hosts just
back after a broker outage) waits in the queue, ``awaiting_inventory``, instead of being
rejected ``unknown_vm``; once the inventories are all in, an unknown VM is rejected at once."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ferry_cli.cluster import build_coordinator
from ferry_coordinator.service import CoordinatorService
from tests.harness import FAST, Cluster, check_invariants, make_cluster, new_bus, until

HOSTS = ("host-a", "host-b")


class Gate:
    """The new coordinator's inventories are dropped while ``closed``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.closed = True
        original = CoordinatorService.on_inventory

        async def gated(svc: CoordinatorService, msg: Any, ctx: Any) -> None:
            if not self.closed:
                await original(svc, msg, ctx)

        monkeypatch.setattr(CoordinatorService, "on_inventory", gated)


async def restart_coordinator(c: Cluster, **timeouts: float) -> CoordinatorService:
    """A new coordinator replaces the running one, on the same store: it knows no host yet."""
    await c.coordinator.stop()
    await c.coordinator.endpoint.close()
    bus = c.buses[0] if c.kind == "memory" else await new_bus("rabbitmq", c.vhost)
    c.buses.append(bus)
    c.coordinator = build_coordinator(bus, c.store, clock=c.clock, timeouts=dataclasses.replace(FAST, **timeouts))
    await c.coordinator.start()
    return c.coordinator


async def codes(c: Cluster, mid: str) -> list[tuple[str, str | None]]:
    return [(e.status, e.code) async for e in c.client.follow(mid, timeout=30)]


@pytest.fixture
async def cluster(bus_kind: str) -> AsyncIterator[Cluster]:
    c = await make_cluster(bus_kind, HOSTS)
    await c.create_vm("host-a", "vm1", memory_mib=256, sim_instant=True)
    await c.send_events("vm1", 3)
    yield c
    await c.close()


async def test_a_request_before_the_inventories_waits_for_them(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    c = cluster
    gate = Gate(monkeypatch)
    coordinator = await restart_coordinator(c)
    known = await c.client.migrate("vm1", "host-b")
    unknown = await c.client.migrate("nope", "host-b")
    followed = asyncio.gather(codes(c, known), codes(c, unknown))
    await asyncio.sleep(1.0)  # many inventory periods: neither is judged without them
    rows = {r["migration_id"]: r for r in await c.client.migrations()}
    assert [rows[m]["data"]["code"] for m in (known, unknown)] == ["awaiting_inventory"] * 2, rows
    assert "runs on no host known yet" in rows[unknown]["data"]["reason"]
    gate.closed = False
    seen_known, seen_unknown = await followed
    assert seen_known[0] == ("queued", "awaiting_inventory") and seen_known[-1] == ("completed", None), seen_known
    assert seen_unknown[0] == ("queued", "awaiting_inventory"), seen_unknown
    assert seen_unknown[-1] == ("rejected", "unknown_vm"), seen_unknown
    await check_invariants(c, "vm1", "host-b")

    # the inventories all in and settled: a VM no host reports is rejected at once
    await until(lambda: _true(coordinator.settled.settled()), 10.0, "the hosts' picture to settle")
    again = await c.client.migrate("nope", "host-a")
    assert await codes(c, again) == [("rejected", "unknown_vm")]


async def test_a_request_waits_for_inventories_at_most_inventory_wait_s(cluster: Cluster,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    c = cluster
    Gate(monkeypatch)  # never opens: no host ever reports
    await restart_coordinator(c, inventory_wait_s=1.5)
    loop = asyncio.get_running_loop()
    asked = loop.time()
    seen = await codes(c, await c.client.migrate("vm1", "host-b"))
    assert seen[0] == ("queued", "awaiting_inventory") and seen[-1] == ("rejected", "unknown_host"), seen
    assert 1.5 <= loop.time() - asked < 5.0


async def _true(value: bool) -> bool:
    return value
