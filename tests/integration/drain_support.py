"""Helpers of the drain tests. The coordinator's dispatcher starts what a drain queues;
``dispatcher`` here only watches the store's queue and lists the migrations it started."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from ferry_common.bus.interfaces import QueueSpec
from ferry_common.bus.topology import (
    COORDINATOR_QUERY,
    DRAIN_STATUSES,
    HOST_DRAIN_REQUEST,
)
from ferry_common.endpoint import Context, Router
from ferry_common.messages.drains import DrainRequest, DrainStatusEvent, GetDrain
from ferry_coordinator.fleet.queue import EntryState
from ferry_coordinator.store import SagaStore
from tests.harness import Cluster, until

SAMPLE_S = 0.02


async def _watch(store: SagaStore, started: list[str]) -> None:
    seen: set[str] = set()
    while True:
        for entry in await store.queue.entries(states=(EntryState.STARTED, EntryState.DONE)):
            if entry.migration_id not in seen:
                seen.add(entry.migration_id)
                started.append(entry.migration_id)
        await asyncio.sleep(SAMPLE_S)


@contextlib.asynccontextmanager
async def dispatcher(c: Cluster, store: SagaStore | None = None) -> AsyncIterator[list[str]]:
    """The migration ids the coordinators' dispatchers started, in the order seen (a list kept
    up to date every ``SAMPLE_S``; wait a little longer than that before reading it)."""
    started: list[str] = []
    task = asyncio.create_task(_watch(store or c.store, started))
    try:
        yield started
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def drain_events(c: Cluster) -> list[DrainStatusEvent]:
    """Every ``host.*.drain.*`` event from now on, as it arrives."""
    seen: list[DrainStatusEvent] = []
    router = Router()
    router.route_key(DRAIN_STATUSES, DrainStatusEvent)

    async def on(msg: DrainStatusEvent, ctx: Context) -> None:
        seen.append(msg)

    router.add(DrainStatusEvent, on)
    await c.client.endpoint.serve(QueueSpec(f"drains.{c.client.endpoint.instance}", (DRAIN_STATUSES,), durable=False), router)
    return seen


async def drain(c: Cluster, host: str, **kw: Any) -> Any:
    return await c.client.endpoint.request(HOST_DRAIN_REQUEST, DrainRequest(host=host, **kw), timeout=10.0)


async def status(c: Cluster, host: str) -> DrainStatusEvent:
    ans = await c.client.endpoint.request(COORDINATOR_QUERY, GetDrain(host=host), timeout=10.0)
    assert isinstance(ans, DrainStatusEvent)
    return ans


async def wait_end(c: Cluster, host: str, timeout: float = 60.0) -> DrainStatusEvent:
    last: list[DrainStatusEvent] = []

    async def ended() -> bool:
        last[:] = [await status(c, host)]
        return last[0].status != "draining" and last[0].in_flight == 0 and last[0].queued == 0
    await until(ended, timeout, f"the drain of {host} to end")
    return last[0]


async def fill(c: Cluster, host: str, n: int, *, prefix: str = "vm", memory_mib: int = 256, **params: Any) -> list[str]:
    """``n`` VMs on ``host`` whose migrations take realistic time (sim bandwidth)."""
    names = [f"{prefix}{i}" for i in range(n)]
    for name in names:
        await c.create_vm(host, name, memory_mib=memory_mib, sim_bandwidth_mibps=params.pop("bw", 512), **params)
    return names
