"""One balancer at a time over several coordinator replicas (real RabbitMQ, PostgreSQL): the
replica leading is killed in the middle of an evaluation, after it chose a move and before
it recorded it; another takes the lease over and balances, and no VM is moved twice."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from ferry_cli.cluster import HostOptions, build_coordinator
from ferry_coordinator.autonomic.ledger import Doc, Ledger
from ferry_coordinator.fleet.queue import Priority
from ferry_coordinator.store.postgres import PostgresSagaStore
from tests.harness import make_cluster, new_bus, until
from tests.postgres import fresh_schema

from .autonomic_support import FAST_RULES, AutomaticSampler, options

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]
HOSTS = ("host-a", "host-b", "host-c")


class Stalling:
    """A ledger that, once, never returns from the write that would record a chosen move: the
    replica is stuck mid-evaluation, as if it was killed there."""

    def __init__(self, inner: Ledger, stuck: list[str], who: str) -> None:
        self.inner, self.stuck, self.who = inner, stuck, who

    async def read(self) -> Doc:
        return await self.inner.read()

    async def write(self, doc: Doc, *, expect: int) -> bool:
        if not self.stuck and doc.body.get("balancer", {}).get("moved_at"):
            self.stuck.append(self.who)
            await asyncio.Event().wait()  # forever: cancelled with the replica
        return await self.inner.write(doc, expect=expect)


async def test_a_balancer_replica_killed_mid_evaluation_is_taken_over_without_duplicates(
        rabbitmq_available: None) -> None:
    async with fresh_schema("ferry_autonomic") as url:
        await _balancer_replica_killed_mid_evaluation(url)


async def _balancer_replica_killed_mid_evaluation(url: str) -> None:
    store = await PostgresSagaStore.open(url)
    opts = {h: HostOptions(inventory_interval_s=0.2, driver_options={"cpus": 16}) for h in HOSTS}
    c = await make_cluster("rabbitmq", HOSTS, options=opts, store=store)
    other_store = await PostgresSagaStore.open(url)
    c.buses.append(await new_bus("rabbitmq", c.vhost))
    other = build_coordinator(c.buses[-1], other_store, clock=c.clock)
    replicas = [c.coordinator, other]
    stuck: list[str] = []
    for r in replicas:
        r.autonomic.options = options("full")
        r.autonomic.ledger = Stalling(r.autonomic.ledger, stuck, r.owner)  # type: ignore[assignment]
    await other.start()
    starter = AutomaticSampler(store, c.client.endpoint, c.clock)
    try:
        for i in range(6):
            await c.create_vm("host-a", f"vm{i}", memory_mib=128, sim_instant=True, sim_cpu=2.0)
        await until(lambda: _known(other), 10, "the second replica to know the VMs")
        starter.start()
        await until(lambda: _true(bool(stuck)), 30, "a replica to choose a move")
        victim = next(r for r in replicas if r.owner == stuck[0])
        survivor = next(r for r in replicas if r is not victim)
        await victim.stop()  # killed mid-evaluation: nothing it chose was recorded or queued
        assert await store.queue.entries() == []

        async def balanced() -> bool:
            es = await store.queue.entries()
            r: Any = survivor.autonomic.last_round
            return bool(es) and not any(e.live for e in es) and r is not None and r.evaluation.idle == "balanced"
        await until(balanced, 90, "the survivor to balance the fleet")
        assert survivor.autonomic.last_round.evaluation.imbalance <= FAST_RULES.threshold
        es = await store.queue.entries()
        moved = Counter(e.vm_id for e in es if e.priority == Priority.REBALANCE)
        assert max(moved.values()) == 1, moved
        assert starter.max_automatic <= 1
        doc = await survivor.autonomic.ledger.read()
        assert doc.owner == survivor.owner
    finally:
        await starter.stop()
        await other.stop()
        await other_store.close()
        await c.close()
        await store.close()


async def _true(v: bool) -> bool:
    return v


async def _known(r: Any) -> bool:
    return all(r.hosts.locate(f"vm{i}") is not None for i in range(6))
