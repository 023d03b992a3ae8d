"""Shared pieces of the full-saga tests on real hypervisors (``test_saga_qemu``, ``test_saga_libvirt``).

A cluster here is the coordinator and two hosts (``host-a``, ``host-b``) on the real RabbitMQ,
each host's adapter driving a real hypervisor. The guest is the repo's dirtying test guest;
its heartbeat shows on which host its vCPU runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ferry_cli.cluster import HostOptions
from ferry_common.messages.public import MigrationStatusEvent
from ferry_coordinator.timeouts import SagaTimeouts
from ferry_testing.sample import graph
from tests.harness import Cluster, inspect_problems, make_cluster

from .conftest import require

# generous for TCG: a loaded 2-core machine answers slowly while two guests run
TCG_TIMEOUTS = SagaTimeouts(
    reply_s=10.0, attempts=2, status_poll_s=0.5, forward_retry_s=0.05, forward_retry_max_s=0.5, lease_s=15.0
)
HOSTS = ("host-a", "host-b")
# a guest that rewrites 64 MiB flat out never converges under a 32 MiB/s cap
STUCK_GUEST: dict[str, Any] = {"guest_dirty_mib": 64, "guest_rate_mibps": 0}
DIRTY_GUEST: dict[str, Any] = {"guest_dirty_mib": 16, "guest_rate_mibps": 64}
CAPPED: dict[str, Any] = {
    "bandwidth_mibps": 32,
    "downtime_limit_ms": 50,
    "completion_timeout_min_s": 4,
    "completion_timeout_per_gib_s": 0,
}
# big enough for the test guests: the real drivers report no capacity of their own
CAPACITY_MIB = 8192


def host_options(driver: str, per_host: dict[str, dict[str, Any]]) -> dict[str, HostOptions]:
    """``HostOptions`` for each host with ``driver`` and that host's driver options."""
    return {
        h: HostOptions(driver=driver, driver_options=opts, capacity_mib=CAPACITY_MIB, inventory_interval_s=0.5)
        for h, opts in per_host.items()
    }


@contextlib.asynccontextmanager
async def saga_cluster(options: dict[str, HostOptions]) -> AsyncIterator[Cluster]:
    """A coordinator and two hosts on a private vhost of the real broker; closed afterwards."""
    c = await make_cluster("rabbitmq", HOSTS, options=options, timeouts=TCG_TIMEOUTS)
    try:
        yield c
    finally:
        for name in HOSTS:
            driver = c.host(name).adapter.driver
            for spec in await driver.list():
                with contextlib.suppress(Exception):
                    await driver.destroy(spec.vm_id)
        await c.close()


@dataclass
class Guest:
    """One test guest with its management graph, and a stream of events while it migrates."""

    cluster: Cluster
    vm_id: str
    stream: asyncio.Task[None] | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def driver(self, host: str) -> Any:
        return self.cluster.host(host).adapter.driver

    async def heartbeat(self, host: str) -> int:
        status = await self.driver(host).guest_status(self.vm_id)
        assert status.valid, status
        return int(status.heartbeat)

    async def wait_booted(self, host: str, timeout_s: float = 15.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            status = await self.driver(host).guest_status(self.vm_id)
            if status.valid and status.heartbeat > 0:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"guest {self.vm_id} did not boot on {host}")

    async def advancing(self, host: str, wait_s: float = 0.3) -> bool:
        before = await self.heartbeat(host)
        await asyncio.sleep(wait_s)
        return await self.heartbeat(host) != before

    def start_stream(self, every_s: float = 0.02, batch: int = 2) -> None:
        """Keep sending events until :meth:`stop_stream`."""

        async def run() -> None:
            while not self.stop.is_set():
                await self.cluster.send_events(self.vm_id, batch)
                await asyncio.sleep(every_s)

        self.stream = asyncio.create_task(run())

    async def stop_stream(self) -> None:
        self.stop.set()
        if self.stream is not None:
            await self.stream


async def start_guest(c: Cluster, guest: dict[str, Any], *, extra_elements: int = 10) -> Guest:
    """A 128 MiB test guest on host-a with its management plane; 20 events dispatched there."""
    vm_id = f"g-{uuid.uuid4().hex[:8]}"
    await c.create_vm("host-a", vm_id, memory_mib=128, g=graph(vm_id, extra_elements=extra_elements), **guest)
    g = Guest(c, vm_id)
    await g.wait_booted("host-a")
    await c.send_events(vm_id, 20)
    await c.settle(vm_id)
    return g


def progress_events(c: Cluster, mid: str) -> list[dict[str, Any]]:
    """The adapter's ``migration.progress`` samples of ``mid`` that the client saw."""
    history: list[MigrationStatusEvent] = c.client._history
    return [
        dict(e.detail)
        for e in history
        if e.migration_id == mid and e.status == "progress" and e.step == "migrate_vm" and "transferred_bytes" in e.detail
    ]


async def wait_progress(c: Cluster, mid: str, timeout_s: float = 30.0) -> None:
    """Until pre-copy has sent some memory (seen through the progress events)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if any(p["transferred_bytes"] > 0 for p in progress_events(c, mid)):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no pre-copy progress of {mid} within {timeout_s:g}s")


async def assert_completed(c: Cluster, g: Guest, mid: str, outcome: MigrationStatusEvent,
                           source_gone: Callable[[], Awaitable[bool]]) -> None:
    """The guest runs on host-b only, the plane is active there, events intact, figures recorded."""
    assert outcome.status == "completed", outcome
    assert await g.advancing("host-b"), "guest does not run on the target"
    assert await source_gone(), "the source still holds the guest"
    await c.send_events(g.vm_id, 10)
    assert await inspect_problems(c, g.vm_id, "host-b") == []
    rec = await c.store.get(mid)
    assert rec is not None and rec.status == "completed"
    stats = rec.data["vm_stats"]
    for key in ("total_time_ms", "downtime_ms", "setup_time_ms", "transferred_bytes"):
        assert key in stats, stats
    assert stats["total_time_ms"] > 0 and stats["transferred_bytes"] > 16 * 1024 * 1024, stats
    samples = progress_events(c, mid)
    assert samples, "no migration.progress events"
    for key in ("transferred_bytes", "remaining_bytes", "dirty_pages_rate", "passes", "percent"):
        assert all(key in s for s in samples), key
    assert samples[-1]["percent"] == 100.0
    assert any(0 < s["transferred_bytes"] for s in samples)


async def assert_rolled_back(c: Cluster, g: Guest, outcome: MigrationStatusEvent, code: str | None = None) -> None:
    """The guest runs on host-a only, its plane active there, events intact, nothing on host-b."""
    assert outcome.status == "rolled_back", outcome
    if code is not None:
        assert outcome.code == code, outcome
    assert await g.driver("host-a").state(g.vm_id) == "running"
    assert await g.advancing("host-a"), "the source guest does not run"
    assert await g.driver("host-b").state(g.vm_id) == "absent"
    await c.send_events(g.vm_id, 10)
    assert await inspect_problems(c, g.vm_id, "host-a") == []


class RollbackSuite:
    """The rollbacks every driver must make, run unchanged by each driver's module: a
    ``Test...`` subclass there supplies a ``cluster`` fixture of its driver and
    :meth:`target_pid`. Each ends with the guest running on host-a only, its plane active
    there and its events intact, and nothing of it left on host-b."""

    def target_pid(self, g: Guest) -> int | None:
        """The pid of the QEMU process that receives ``g`` on host-b."""
        raise NotImplementedError

    @staticmethod
    async def _under_way(cluster: Cluster) -> tuple[Guest, str]:
        """A never-converging guest's migration (no completion timeout to end it), events
        flowing, once pre-copy has sent some memory; the guest and the migration's id."""
        g = await start_guest(cluster, STUCK_GUEST)
        g.start_stream(every_s=0.05)
        mid = await cluster.client.migrate(g.vm_id, "host-b", params={**CAPPED, "completion_timeout_min_s": 120})
        await wait_progress(cluster, mid)
        return g, mid

    async def test_non_converging_guest_rolls_back_on_completion_timeout(self, cluster: Cluster) -> None:
        g = await start_guest(cluster, STUCK_GUEST)
        g.start_stream(every_s=0.05)
        mid = await cluster.client.migrate(g.vm_id, "host-b", params=CAPPED)
        outcome = await cluster.client.outcome(mid, timeout=60)
        await g.stop_stream()
        assert "completion timeout" in (outcome.reason or ""), outcome
        await assert_rolled_back(cluster, g, outcome, code="vm_migration_failed")

    async def test_operator_cancel_mid_migration_rolls_back(self, cluster: Cluster) -> None:
        g, mid = await self._under_way(cluster)
        await cluster.client.cancel(mid)
        outcome = await cluster.client.outcome(mid, timeout=60)
        await g.stop_stream()
        await assert_rolled_back(cluster, g, outcome, code="cancelled")

    async def test_target_qemu_killed_mid_migration_rolls_back(self, cluster: Cluster) -> None:
        g, mid = await self._under_way(cluster)
        pid = self.target_pid(g)
        assert pid is not None, "no receiving QEMU on host-b"
        os.kill(pid, signal.SIGKILL)
        outcome = await cluster.client.outcome(mid, timeout=60)
        await g.stop_stream()
        await assert_rolled_back(cluster, g, outcome, code="vm_migration_failed")


__all__ = [
    "CAPPED",
    "DIRTY_GUEST",
    "STUCK_GUEST",
    "TCG_TIMEOUTS",
    "Guest",
    "RollbackSuite",
    "assert_completed",
    "assert_rolled_back",
    "host_options",
    "progress_events",
    "require",
    "saga_cluster",
    "start_guest",
    "wait_progress",
]
