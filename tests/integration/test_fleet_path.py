"""The fleet machinery in the request path: every MigrateRequest queued in the store, started
under the limits by the coordinators' dispatchers, explained while it waits, placed when no
target is given, cancellable while queued; a dead host fails its migrations over at once."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import Counter
from typing import Any

import pytest

from ferry_cli.cluster import HostOptions, build_coordinator
from ferry_common import metrics
from ferry_coordinator.fleet.queue import EntryState, Limits
from ferry_coordinator.service import CoordinatorService
from ferry_coordinator.store import SagaStore
from tests.harness import Cluster, make_cluster, metric_sample, new_bus, until

HOSTS = ("host-a", "host-b", "host-c", "host-d")
LIMITS = Limits(cluster=5, outbound_per_host=2, inbound_per_host=2)
PG = os.environ.get("FERRY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def over_limits(started: list[Any], limits: Limits) -> list[str]:
    """What in a set of migrations in flight (each with source_host, target_host) exceeds a limit."""
    problems = []
    if len(started) > limits.cluster:
        problems.append(f"cluster {len(started)} > {limits.cluster}")
    for host, n in Counter(e.source_host for e in started).items():
        if n > limits.outbound_per_host:
            problems.append(f"outbound {host} {n}")
    for host, n in Counter(e.target_host for e in started).items():
        if n > limits.inbound_per_host:
            problems.append(f"inbound {host} {n}")
    return problems


def overlaps(intervals: list[tuple[float, float, Any]], limits: Limits) -> list[str]:
    """Replay [start, end) intervals: at each start, what was in flight must be within the limits."""
    problems = []
    for start, _, _ in intervals:
        live = [item for s, e, item in intervals if s <= start < e]
        problems += over_limits(live, limits)
    return problems


class Sampler:
    """Every 100 ms, the slots held in the store, checked against the limits."""

    def __init__(self, store: SagaStore, limits: Limits) -> None:
        self.store, self.limits = store, limits
        self.problems: list[str] = []
        self.max_seen = 0
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            started = await self.store.queue.entries(states={EntryState.STARTED})
            self.max_seen = max(self.max_seen, len(started))
            self.problems += over_limits(started, self.limits)
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def bulk(c: Cluster, stores: list[SagaStore], n: int = 30) -> None:
    """``n`` VMs on four hosts, each asked to move to the next host all at once: sampled while
    they run and replayed from the store afterwards, no limit is ever exceeded."""
    await c.store.queue.set_limits(LIMITS)
    vms = []
    for i in range(n):
        vm = f"vm{i}"
        # 256 MiB at 384 MiB/s: about 0.7 s each
        await c.create_vm(HOSTS[i % 4], vm, memory_mib=256, sim_bandwidth_mibps=384)
        vms.append((vm, HOSTS[(i + 1) % 4]))
    sampler = Sampler(c.store, LIMITS)
    try:
        mids = [await c.client.migrate(vm, target) for vm, target in vms]
        outcomes = await asyncio.gather(*(c.client.outcome(m, timeout=120) for m in mids))
    finally:
        await sampler.stop()
    assert [o.status for o in outcomes] == ["completed"] * n, [(o.status, o.code, o.reason) for o in outcomes]
    assert sampler.problems == []
    assert sampler.max_seen == LIMITS.cluster  # the limit was reached, so it was tested
    for store in stores:  # every replica's store: the same rows
        entries = await store.queue.entries()
        assert {e.state for e in entries} == {EntryState.DONE}
        # a claim's time is read before its transaction waits for the store, a release's (the
        # saga's last save) before its own: a claim may look up to that wait older than the
        # release it followed. Real excess lasts a whole migration (~0.7 s), not 0.1 s
        assert overlaps([((e.started_at or 0) + 0.1, e.ended_at or 0, e) for e in entries], LIMITS) == []
        # the sagas' own history (strictly inside their slots' time, read in order): no slack
        records = [await store.get(m) for m in mids]
        spans = [(r.history[0].at, r.history[-1].at, r) for r in records if r is not None]
        assert len(spans) == n and overlaps(spans, LIMITS) == []
        # each started once: one saga each, one slot each
        assert Counter(e.migration_id for e in entries) == Counter(mids)


async def test_many_requests_never_exceed_the_limits(bus_kind: str) -> None:
    c = await make_cluster(bus_kind, HOSTS)
    try:
        await bulk(c, [c.store])
    finally:
        await c.close()


@pytest.fixture
async def two_replicas(bus_kind: str, tmp_path: Any):
    """Two coordinators on one store: PostgreSQL on RabbitMQ, sqlite on the memory bus."""
    if bus_kind == "rabbitmq":
        from ferry_coordinator.store.postgres import PostgresSagaStore

        schema = f"ferry_fleet_{uuid.uuid4().hex[:8]}"
        opened = [await PostgresSagaStore.open(f"{PG}?schema={schema}") for _ in range(2)]
    else:
        from ferry_coordinator.store.sqlite import SqliteSagaStore

        opened = [await SqliteSagaStore.open(f"sqlite:///{tmp_path / 'sagas.db'}") for _ in range(2)]
    c = await make_cluster(bus_kind, HOSTS, store=opened[0])
    bus = c.buses[0] if bus_kind == "memory" else await new_bus(bus_kind, c.vhost)
    if bus is not c.buses[0]:
        c.buses.append(bus)
    other: CoordinatorService = build_coordinator(bus, opened[1], clock=c.clock, timeouts=c.coordinator.timeouts)
    await other.start()

    async def known() -> bool:
        return all(other.hosts.known(h) for h in HOSTS)
    await until(known, 10, "the second replica to know every host")
    yield c, opened
    await other.stop()
    await other.endpoint.close()
    await c.close()
    for s in opened:
        await s.close()
    if bus_kind == "rabbitmq":
        import asyncpg

        conn = await asyncpg.connect(PG)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


async def test_two_replicas_on_one_store_never_exceed_the_limits(two_replicas: Any) -> None:
    c, stores = two_replicas
    await bulk(c, stores, n=20)


async def _queued_codes(c: Cluster, mid: str, until_outcome: bool = True) -> list[tuple[float, str | None]]:
    seen = []
    async for e in c.client.follow(mid, timeout=60):
        if e.status == "queued":
            seen.append((time.monotonic(), e.code))
    return seen


async def test_queued_reason_appears_within_a_second_and_changes_as_slots_free(bus_kind: str) -> None:
    c = await make_cluster(bus_kind, HOSTS)
    try:
        await c.store.queue.set_limits(Limits(cluster=1, outbound_per_host=1, inbound_per_host=1))
        await c.create_vm("host-a", "vm1", memory_mib=256, sim_bandwidth_mibps=256)  # ~1 s each
        await c.create_vm("host-a", "vm2", memory_mib=256, sim_bandwidth_mibps=256)
        await c.create_vm("host-c", "vm3", memory_mib=256, sim_bandwidth_mibps=256)
        m1 = await c.client.migrate("vm1", "host-b")
        async for e in c.client.follow(m1, timeout=10):
            if e.status == "accepted":
                break
        asked = time.monotonic()
        m2 = await c.client.migrate("vm2", "host-d")  # same source as vm1
        m3 = await c.client.migrate("vm3", "host-b")  # same target as vm1
        seen2, seen3 = await asyncio.gather(_queued_codes(c, m2), _queued_codes(c, m3))
        outcomes = [await c.client.outcome(m, timeout=30) for m in (m1, m2, m3)]
        assert [o.status for o in outcomes] == ["completed"] * 3
        assert seen2 and seen2[0][1] == "source_outbound" and seen2[0][0] - asked < 1.0, seen2
        # vm1 ends: vm2 (older) takes the one cluster slot; vm3's target is free, the cluster is not
        assert [code for _, code in seen3] == ["target_inbound", "cluster_limit"], seen3
        assert seen3[0][0] - asked < 1.0
        rows = await c.client.migrations()
        assert all(r["status"] != "queued" for r in rows)
    finally:
        await c.close()


async def test_a_queued_migration_cancelled_never_starts(bus_kind: str) -> None:
    c = await make_cluster(bus_kind, HOSTS)
    try:
        await c.store.queue.set_limits(Limits(cluster=1, outbound_per_host=1, inbound_per_host=1))
        await c.create_vm("host-a", "vm1", memory_mib=512, sim_bandwidth_mibps=256)  # ~2 s
        await c.create_vm("host-c", "vm2", memory_mib=256, sim_instant=True)
        m1 = await c.client.migrate("vm1", "host-b")
        m2 = await c.client.migrate("vm2", "host-d", migration_id="queued-then-cancelled")
        async for e in c.client.follow(m2, timeout=10):
            if e.status == "queued":
                assert e.code == "cluster_limit"
                break
        rows = {r["migration_id"]: r for r in await c.client.migrations()}
        assert rows[m2]["status"] == "queued" and rows[m2]["data"]["code"] == "cluster_limit"
        text = metrics.REGISTRY.render()  # set by the dispatcher's pass that announced it
        assert metric_sample(text, "ferry_fleet_queue_depth", '{reason="cluster_limit"}') == 1
        assert metric_sample(text, "ferry_fleet_slots_in_use") == 1
        await c.client.cancel(m2, "not now")
        outcome = await c.client.outcome(m2, timeout=10)
        assert (outcome.status, outcome.code) == ("rejected", "cancelled")
        assert (await c.client.outcome(m1, timeout=30)).status == "completed"
        # asked again with the same id: still the same cancelled migration, never started
        await c.client.migrate("vm2", "host-d", migration_id=m2)
        await asyncio.sleep(1.0)
        rec = await c.store.get(m2)
        assert rec is not None and (rec.status, rec.data["code"]) == ("rejected", "cancelled")
        entry = await c.store.queue.get(m2)
        assert entry is not None and entry.state is EntryState.CANCELLED and entry.started_at is None
        assert c.coordinator.hosts.locate("vm2")[0] == "host-c"  # type: ignore[index]
    finally:
        await c.close()


async def test_placement_picks_a_fitting_host_or_says_why_none_fits(bus_kind: str) -> None:
    options = {
        "host-a": HostOptions(inventory_interval_s=0.5, capacity_mib=8192, driver_options={"capacity_mib": 8192}),
        "host-b": HostOptions(inventory_interval_s=0.5, capacity_mib=1024, driver_options={"capacity_mib": 1024}),  # too small
        "host-c": HostOptions(inventory_interval_s=0.5, capacity_mib=8192, driver_options={"capacity_mib": 8192}, labels={"disk": "hdd"}),
        "host-d": HostOptions(inventory_interval_s=0.5, capacity_mib=8192, driver_options={"capacity_mib": 8192}, labels={"disk": "ssd"}),
    }
    c = await make_cluster(bus_kind, HOSTS, options=options)
    try:
        await c.create_vm("host-a", "vm1", memory_mib=2048, sim_instant=True)
        c.coordinator.fleet.view.cordon("host-d")
        outcome = await c.client.outcome(await c.client.migrate("vm1"), timeout=30)
        assert (outcome.status, outcome.target_host) == ("completed", "host-c")  # the one that fits
        await c.wait_placement("vm1", "host-c")
        hosts = {h["host"]: h for h in await c.client.hosts()}
        assert hosts["host-d"]["state"] == "cordoned" and hosts["host-d"]["labels"] == {"disk": "ssd"}
        assert hosts["host-b"]["capacity_mib"] == 1024
        # nothing fits a VM bigger than every host's free memory: rejected, with each host's reason
        await c.create_vm("host-a", "big", memory_mib=4096, sim_instant=True)
        await c.create_vm("host-c", "filler", memory_mib=4096, sim_instant=True)
        await until(_used(c, "host-c", 6144), 10, "host-c's inventory to count its VMs")
        outcome = await c.client.outcome(await c.client.migrate("big"), timeout=10)
        assert (outcome.status, outcome.code) == ("rejected", "no_placement")
        assert outcome.reason is not None
        assert "host-b: insufficient memory" in outcome.reason and "host-d: cordoned" in outcome.reason
        assert "host-c: insufficient memory" in outcome.reason
    finally:
        await c.close()


def _used(c: Cluster, host: str, mib: int) -> Any:
    async def check() -> bool:
        h = c.coordinator.fleet.view.hosts.get(host)
        return h is not None and h.used_mib >= mib
    return check


async def test_limits_are_shown_and_changed_at_run_time(bus_kind: str) -> None:
    c = await make_cluster(bus_kind, HOSTS)
    try:
        info = await c.client.limits()
        assert (info["cluster"], info["outbound_per_host"], info["inbound_per_host"]) == (5, 2, 2)
        info = await c.client.limits(cluster=7, inbound=3)
        assert (info["cluster"], info["outbound_per_host"], info["inbound_per_host"]) == (7, 2, 3)
        assert (await c.store.queue.limits()).cluster == 7
    finally:
        await c.close()


async def test_a_target_host_that_dies_mid_migration_rolls_back_at_once(bus_kind: str) -> None:
    c = await make_cluster(bus_kind, HOSTS)
    try:
        # 4 GiB at 256 MiB/s: 16 s of pre-copy, far beyond the liveness bound (3 x 0.5 s)
        await c.create_vm("host-a", "vm1", memory_mib=4096, sim_bandwidth_mibps=256)
        await c.send_events("vm1", 8)
        mid = await c.client.migrate("vm1", "host-b")
        async for e in c.client.follow(mid, timeout=30):
            if e.step == "migrate_vm":
                break
        stopped = time.monotonic()
        await c.host("host-b").stop()  # every service of the host, its inventory with them
        outcome = await c.client.outcome(mid, timeout=60)
        elapsed = time.monotonic() - stopped
        print(f"rolled back {elapsed:.2f} s after the target's services stopped")
        assert (outcome.status, outcome.code) == ("rolled_back", "timeout"), outcome
        assert "not ready" in (outcome.reason or "")
        assert elapsed < 10.0  # generous: the bound is 1.5 s; without liveness it waits out the pre-copy
        assert c.coordinator.hosts.locate("vm1")[0] == "host-a"  # type: ignore[index]
    finally:
        await c.close()


async def test_a_placed_target_that_denies_admission_is_replaced_by_the_next(bus_kind: str) -> None:
    options = {
        "host-a": HostOptions(inventory_interval_s=0.5),
        # the most free memory, so ranked first, but its policy takes nothing from host-a
        "host-b": HostOptions(inventory_interval_s=0.5, allowed_sources=("host-z",),
                              driver_options={"capacity_mib": 1 << 20}),
        "host-c": HostOptions(inventory_interval_s=0.5),
    }
    c = await make_cluster(bus_kind, ("host-a", "host-b", "host-c"), options=options)
    try:
        await c.create_vm("host-a", "vm1", memory_mib=256, sim_instant=True)
        mid = await c.client.migrate("vm1")
        outcome = await c.client.outcome(mid, timeout=30)
        assert (outcome.status, outcome.target_host) == ("completed", "host-c")
        rec = await c.store.get(mid)
        assert rec is not None and [d["host"] for d in rec.data["denials"]] == ["host-b"]
        assert any(h.event == "note" and h.detail.get("next_target") == "host-c" for h in rec.history)
    finally:
        await c.close()


async def test_entries_enqueued_in_the_store_start_and_an_orphaned_claim_is_resumed_once(bus_kind: str) -> None:
    """The store's queue is the interface for other producers (drains, the balancer): an entry
    they enqueue is started by the dispatcher; one claimed by a replica that died before it
    created the saga is started by another after the grace period, once."""
    from ferry_coordinator.fleet.queue import Priority, new_entry

    c = await make_cluster(bus_kind, HOSTS)
    try:
        await c.create_vm("host-a", "vm1", memory_mib=256, sim_instant=True)
        await c.create_vm("host-c", "vm2", memory_mib=256, sim_instant=True)
        q, now = c.store.queue, c.clock.now()
        # claimed at once (no await yields between the two on this store) by a replica that then dies
        await q.enqueue(new_entry("orphan-1", "vm2", "host-c", ("host-d",), now=now, request={}))
        orphan = await q.claim_next("coordinator.dead", now=now)
        assert orphan is not None and orphan.migration_id == "orphan-1" and await c.store.get("orphan-1") is None
        await q.enqueue(new_entry("drain-1", "vm1", "host-a", ("host-b",), priority=Priority.DRAIN, group="drain-a",
                                  now=now, request={"reason": "drain host-a"}))
        first = await c.client.outcome("drain-1", timeout=30)
        assert first.status == "completed" and first.target_host == "host-b"
        outcome = await c.client.outcome("orphan-1", timeout=30)
        assert (outcome.status, outcome.target_host) == ("completed", "host-d")
        rec = await c.store.get("orphan-1")
        assert rec is not None and rec.owner == c.coordinator.owner
        assert sum(1 for h in rec.history if (h.step, h.event) == ("admission", "started")) == 1
        assert (await q.get("orphan-1")).state is EntryState.DONE  # type: ignore[union-attr]
    finally:
        await c.close()
