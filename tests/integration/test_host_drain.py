"""Host drain and maintenance (issue 15), on the in-process bus and on real RabbitMQ, with the
sim driver moving each VM in about half a second.

The queue entries the drain asks for are started by the coordinator's dispatcher."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from ferry_common.bus.topology import HOST_DRAIN_CANCEL, HOST_UNCORDON
from ferry_common.messages.drains import DrainCancel, DrainPlan, DrainStatusEvent, HostUncordon
from ferry_coordinator.fleet.queue import EntryState
from tests.harness import Cluster, check_invariants, make_cluster, until

from .drain_support import dispatcher, drain, drain_events, fill, status, wait_end

HOSTS = ("host-a", "host-b", "host-c", "host-d")


@pytest.fixture
async def cluster(bus_kind: str):
    c = await make_cluster(bus_kind, HOSTS)
    yield c
    await c.close()


def placement_of(c: Cluster, vm: str) -> str | None:
    loc = c.coordinator.hosts.locate(vm)
    return loc[0] if loc else None


async def sagas_by_vm(c: Cluster) -> Counter[str]:
    """Completed migrations per VM, from the store."""
    done: Counter[str] = Counter()
    for rec in await c.store.list(limit=1000):
        if rec.status == "completed":
            done[rec.vm_id] += 1
    return done


async def test_drain_moves_every_vm_once_and_keeps_the_host_cordoned(cluster: Cluster) -> None:
    vms = await fill(cluster, "host-a", 10)
    for vm in vms[:3]:
        await cluster.send_events(vm, 5)
    events = await drain_events(cluster)
    async with dispatcher(cluster):
        ans = await drain(cluster, "host-a")
        assert isinstance(ans, DrainStatusEvent) and ans.status == "draining" and ans.total == 10
        end = await wait_end(cluster, "host-a")
    assert (end.status, end.done, end.failed) == ("drained", 10, 0), end
    for vm in vms:
        where = placement_of(cluster, vm)
        assert where is not None and where != "host-a"
        if vm in vms[:3]:
            await cluster.send_events(vm, 5)
        await check_invariants(cluster, vm, where)
    assert set((await sagas_by_vm(cluster)).values()) == {1}  # each VM migrated exactly once
    assert await cluster.store.drains.cordoned() == {"host-a"}
    await until(lambda: _has(events, "drained"), 5, "the drained event")
    assert any(e.status == "draining" and 0 < e.done < 10 for e in events)  # progress on the way
    assert any(e.eta_s is not None for e in events if e.status == "draining")


async def _has(events: list[DrainStatusEvent], status_: str) -> bool:
    return any(e.status == status_ for e in events)


async def test_dry_run_changes_nothing_and_names_the_unmovable(cluster: Cluster) -> None:
    vms = await fill(cluster, "host-a", 4)
    await cluster.create_vm("host-a", "pinned", memory_mib=256, pinned=True)
    plan = await drain(cluster, "host-a", dry_run=True)
    assert isinstance(plan, DrainPlan)
    assert sorted(p.vm_id for p in plan.vms) == sorted(vms)
    assert all(p.target in ("host-b", "host-c", "host-d") for p in plan.vms)
    assert [p.order for p in plan.vms] == list(range(4)) and plan.estimate_s > 0
    assert [(p.vm_id, p.reason) for p in plan.unmovable] == [("pinned", "pinned by policy (pinned: true)")]
    await asyncio.sleep(0.5)
    assert await cluster.store.drains.list() == []
    assert await cluster.store.queue.entries() == []
    assert await cluster.store.drains.cordoned() == set()
    assert all(placement_of(cluster, vm) == "host-a" for vm in vms)


@pytest.mark.parametrize("on_unmovable", ["block", "leave"])
async def test_an_unmovable_vm_blocks_or_is_left(cluster: Cluster, on_unmovable: str) -> None:
    vms = await fill(cluster, "host-a", 3)
    await cluster.create_vm("host-a", "pinned", memory_mib=256, pinned=True)
    async with dispatcher(cluster):
        await drain(cluster, "host-a", on_unmovable=on_unmovable)
        end = await wait_end(cluster, "host-a")
    assert end.done == 3 and end.unmovable_vms == {"pinned": "pinned by policy (pinned: true)"}
    assert end.status == ("failed" if on_unmovable == "block" else "drained")
    assert "pinned" in (end.reason or "")
    assert placement_of(cluster, "pinned") == "host-a"
    assert all(placement_of(cluster, vm) != "host-a" for vm in vms)
    assert await cluster.store.drains.cordoned() == {"host-a"}


async def test_cancel_starts_nothing_more_afterwards(cluster: Cluster) -> None:
    await fill(cluster, "host-a", 10)
    async with dispatcher(cluster) as started:
        await drain(cluster, "host-a")
        await until(lambda: _n(started, 2), 10, "two migrations to start")
        ans = await cluster.client.endpoint.request(HOST_DRAIN_CANCEL, DrainCancel(host="host-a"), timeout=10)
        assert isinstance(ans, DrainStatusEvent) and ans.status == "cancelled"
        await asyncio.sleep(0.2)  # the list of started ones catches up with the store
        at_cancel = len(started)
        await asyncio.sleep(3.0)  # the classic bug: something of the drain starts later anyway
        assert len(started) == at_cancel, started
        end = await wait_end(cluster, "host-a")
    assert end.status == "cancelled" and end.done == at_cancel and end.done < 10
    queued = await cluster.store.queue.entries(states=(EntryState.QUEUED,))
    assert queued == []
    left = [vm for vm in (f"vm{i}" for i in range(10)) if placement_of(cluster, vm) == "host-a"]
    assert len(left) == 10 - at_cancel


async def _n(started: list[str], n: int) -> bool:
    return len(started) >= n


async def test_a_rolled_back_vm_is_retried_on_another_host(cluster: Cluster) -> None:
    from ferry_common.messages.commands import MigrationDenied
    from tests.harness import inject_answer

    await fill(cluster, "host-a", 3)
    # host-b takes nothing: every migration towards it rolls back at admission
    inject_answer(cluster.host("host-b"), "migration_policy", "StartMigration",
                  MigrationDenied(code="insufficient_resources", reason="test: host-b refuses"))
    async with dispatcher(cluster):
        await drain(cluster, "host-a")
        end = await wait_end(cluster, "host-a")
    assert (end.status, end.done) == ("drained", 3), end
    d = await cluster.store.drains.latest("host-a")
    assert d is not None
    retried = [v for v in d.vms.values() if v.tried]
    assert retried and all(v.tried == ["host-b"] and v.attempt == 2 and v.target != "host-b" for v in retried)
    for vm in d.vms:
        assert placement_of(cluster, vm) in ("host-c", "host-d")


async def test_every_attempt_failing_ends_the_drain_failed(cluster: Cluster) -> None:
    from ferry_common.messages.commands import MigrationDenied
    from tests.harness import inject_answer

    await fill(cluster, "host-a", 1)
    for h in ("host-b", "host-c", "host-d"):
        inject_answer(cluster.host(h), "migration_policy", "StartMigration",
                      MigrationDenied(code="insufficient_resources", reason=f"test: {h} refuses"))
    async with dispatcher(cluster):
        await drain(cluster, "host-a", max_attempts=3)
        end = await wait_end(cluster, "host-a")
    assert end.status == "failed" and end.failed_vms == ["vm0"] and "vm0" in (end.reason or "")
    d = await cluster.store.drains.latest("host-a")
    assert d is not None and sorted(d.vms["vm0"].tried) == ["host-b", "host-c", "host-d"]
    assert await cluster.store.drains.cordoned() == {"host-a"}


async def test_undrain_return_brings_the_vms_back(cluster: Cluster) -> None:
    vms = await fill(cluster, "host-a", 4)
    async with dispatcher(cluster):
        await drain(cluster, "host-a")
        assert (await wait_end(cluster, "host-a")).status == "drained"
        ans = await cluster.client.endpoint.request(HOST_UNCORDON, HostUncordon(host="host-a", return_vms=True), timeout=10)
        assert isinstance(ans, DrainStatusEvent)
        assert await cluster.store.drains.cordoned() == set()

        async def back() -> bool:
            return all(placement_of(cluster, vm) == "host-a" for vm in vms)
        await until(back, 30, "the VMs to come back")
    for vm in vms:
        await check_invariants(cluster, vm, "host-a")


async def test_cli_drain_shows_progress_and_exits_0_only_when_the_host_is_empty(cluster: Cluster) -> None:
    import io

    from rich.console import Console

    from ferry_cli.hosts_cli import NOT_EMPTY, UNMOVABLE, run_drain

    await fill(cluster, "host-a", 3)
    out = io.StringIO()
    console = Console(file=out, width=200)
    async with dispatcher(cluster):
        assert await run_drain(cluster.client, "host-a", console=console, timeout=60) == 0
        assert "drained; 3/3 moved" in out.getvalue()
        # a pinned VM on host-b: the dry run names it (exit 3); left behind, the host is not empty (exit 1)
        await cluster.create_vm("host-b", "pinned", memory_mib=256, pinned=True)
        assert await run_drain(cluster.client, "host-b", console=console, dry_run=True) == UNMOVABLE
        assert "cannot move pinned: pinned by policy" in out.getvalue()
        assert await run_drain(cluster.client, "host-b", console=console, on_unmovable="leave", timeout=60) == NOT_EMPTY
        assert "host-b still runs: pinned" in out.getvalue()


async def test_drain_metrics_feed_the_alert_and_the_trace_links_its_migrations(cluster: Cluster) -> None:
    from pathlib import Path

    from ferry_common import metrics
    from tests.harness import metric_sample

    await fill(cluster, "host-a", 3)
    alerts = (Path(__file__).parents[2] / "deploy/prometheus/ferry-alerts.yaml").read_text()
    assert "ferry_fleet_drain_remaining" in alerts  # the alert's metric is the one set here
    async with dispatcher(cluster):
        await drain(cluster, "host-a")

        async def moving() -> bool:
            text = metrics.REGISTRY.render()
            return metric_sample(text, "ferry_fleet_drain_remaining", '{host="host-a"}') > 0
        await until(moving, 10, "the drain's remaining VMs as a metric")
        end = await wait_end(cluster, "host-a")
    assert end.status == "drained"
    text = metrics.REGISTRY.render()
    assert metric_sample(text, "ferry_fleet_drain_remaining", '{host="host-a"}') == 0
    assert metric_sample(text, "ferry_fleet_drain_vms", '{host="host-a",state="done"}') == 3
    d = await cluster.store.drains.latest("host-a")
    assert d is not None and d.trace_links, "the drain's root span links its migrations' traces"
    roots = {(await cluster.store.spans(v.migration_id or ""))[0]["trace_id"] for v in d.vms.values()}
    assert {link.split(":")[0] for link in d.trace_links} <= roots


async def test_cancel_abort_rolls_back_those_in_flight(cluster: Cluster) -> None:
    vms = await fill(cluster, "host-a", 4, memory_mib=1024, bw=256)  # ~4 s each
    for vm in vms:
        await cluster.send_events(vm, 3)
    async with dispatcher(cluster) as started:
        await drain(cluster, "host-a")

        async def two_in_flight() -> bool:
            return (await status(cluster, "host-a")).in_flight == 2
        await until(two_in_flight, 10, "two migrations in flight")
        ans = await cluster.client.endpoint.request(HOST_DRAIN_CANCEL, DrainCancel(host="host-a", abort=True), timeout=10)
        assert isinstance(ans, DrainStatusEvent) and ans.status == "cancelled"
        end = await wait_end(cluster, "host-a", timeout=30)
        await asyncio.sleep(1.0)
        assert len(started) == 2
    assert (end.status, end.done) == ("cancelled", 0), end
    for mid in started:
        rec = await cluster.store.get(mid)
        assert rec is not None and rec.status == "rolled_back"
    for vm in vms:
        await check_invariants(cluster, vm, "host-a")


async def test_a_deadline_ends_the_drain_failed_and_starts_nothing_more(cluster: Cluster) -> None:
    await fill(cluster, "host-a", 8)
    async with dispatcher(cluster) as started:
        await drain(cluster, "host-a", deadline_s=1.0)
        end = await wait_end(cluster, "host-a", timeout=30)
        await asyncio.sleep(0.2)  # the list of started ones catches up with the store
        n = len(started)
        await asyncio.sleep(1.5)
        assert len(started) == n
    assert end.status == "failed" and (end.reason or "").startswith("deadline passed; still there: ")
    assert 0 < n < 8 and end.done == n
    assert await cluster.store.queue.entries(states=(EntryState.QUEUED,)) == []


async def test_two_drains_at_once_never_place_on_each_others_host(cluster: Cluster) -> None:
    a = await fill(cluster, "host-a", 4, prefix="a")
    b = await fill(cluster, "host-b", 4, prefix="b")
    async with dispatcher(cluster):
        await drain(cluster, "host-a")
        await drain(cluster, "host-b")
        ends = [await wait_end(cluster, h) for h in ("host-a", "host-b")]
    assert [(e.status, e.done) for e in ends] == [("drained", 4), ("drained", 4)]
    for vm in a + b:
        assert placement_of(cluster, vm) in ("host-c", "host-d")
    assert await cluster.store.drains.cordoned() == {"host-a", "host-b"}
