"""The balancer end to end, on the memory bus and real RabbitMQ, sim hosts with a load model:
full mode converges without storms or ping-pong, manual mode only recommends (and a
recommendation applied runs), partial mode evacuates a faulty host and only recommends load
moves, and a VM's own embot asks for its VM to move after repeated disk errors."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from ferry_cli.cluster import HostOptions
from ferry_common.bus.topology import COORDINATOR_QUERY, host_event
from ferry_common.messages.commands import Done
from ferry_common.messages.drains import DrainStatusEvent
from ferry_common.messages.host_events import HostFaultEvent
from ferry_common.messages.public import VmEvent
from ferry_common.messages.recommendations import ApplyRecommendation
from ferry_common.planes.commands import apply_command
from ferry_common.planes.convert import modules_of, retarget, to_graph
from ferry_common.planes.loader import load_plane
from ferry_common.tracing import installed
from ferry_coordinator.autonomic.snapshot import FilteredPlacement
from ferry_coordinator.balance import Balancer
from ferry_coordinator.fleet.queue import EntryState, Priority, new_entry
from ferry_testing.sample import examples_dir
from tests.harness import Cluster, make_cluster, until

from .autonomic_support import (
    FAST_RULES,
    AutomaticSampler,
    options,
    recommendation_events,
    recommendations,
)
from .drain_support import drain, status, wait_end

HOSTS = ("host-a", "host-b", "host-c")


@asynccontextmanager
async def running(bus_kind: str, level: str, layout: dict[str, list[tuple[str, float]]],
                  **opts: Any) -> AsyncIterator[tuple[Cluster, AutomaticSampler]]:
    """A cluster at automation ``level`` with the VMs of ``layout`` (host -> [(vm, cpu)]), and
    the sampler of the queue's started entries; both stopped on the way out."""
    hosts = {h: HostOptions(inventory_interval_s=0.2, driver_options={"cpus": 16}) for h in HOSTS}
    c = await make_cluster(bus_kind, HOSTS, options=hosts)
    try:
        c.coordinator.autonomic.options = options(level, **opts)
        for host, vms in layout.items():
            for vm_id, cpu in vms:
                await c.create_vm(host, vm_id, memory_mib=128, sim_instant=True, sim_cpu=cpu)
        s = AutomaticSampler(c.store, c.client.endpoint, c.clock)
        s.start()
        try:
            yield c, s
        finally:
            await s.stop()
    finally:
        await c.close()


async def entries(c: Cluster) -> list:
    return await c.store.queue.entries()


def placement(c: Cluster, host: str) -> set[str]:
    return set(c.coordinator.hosts.placement().get(host, []))


async def test_full_mode_converges_with_no_vm_moved_twice_and_one_move_in_flight(bus_kind: str) -> None:
    async with running(bus_kind, "full", {"host-a": [(f"vm{i}", 2.0) for i in range(6)]}) as (c, s):
        auto = c.coordinator.autonomic
        async def balanced() -> bool:
            live = [e for e in await entries(c) if e.live]
            r = auto.last_round
            return not live and r is not None and r.evaluation.idle == "balanced" and len(await entries(c)) > 0
        await until(balanced, 60, "the fleet to be balanced")
        assert auto.last_round.evaluation.imbalance <= FAST_RULES.threshold
        moved = Counter(e.vm_id for e in await entries(c) if e.priority == Priority.REBALANCE)
        assert moved and max(moved.values()) == 1, moved  # no VM twice within its cooldown
        assert s.max_automatic <= 1
        where = c.coordinator.hosts.placement()
        assert sorted(len(where[h]) for h in HOSTS) == [2, 2, 2]
        for e in await entries(c):
            rec = await c.store.get(e.migration_id)
            assert rec is not None and rec.status == "completed"
            why = rec.data["why"]
            assert why["policy"] == "balance.load" and why["level"] == "full" and why["kind"] == "load"
            assert why["figures"]["imbalance_before"] > why["figures"]["imbalance_after"]


async def test_manual_mode_moves_nothing_and_lists_the_same_moves(bus_kind: str) -> None:
    async with running(bus_kind, "manual", {"host-a": [(f"vm{i}", 2.0) for i in range(6)]}) as (c, s):
        auto = c.coordinator.autonomic
        async def recommended() -> bool:
            return bool((await recommendations(c.client)).recommendations)
        await until(recommended, 30, "a recommendation")
        listed = await recommendations(c.client)
        assert listed.level == "manual"
        assert await entries(c) == [] and await c.store.list() == []
        assert len(c.coordinator.hosts.placement()["host-a"]) == 6
        # the same moves a full-mode balancer would start on this snapshot
        doc = await auto.ledger.read()
        snap = auto.snapshot(doc, [])
        rules = FAST_RULES.__class__(**{**FAST_RULES.__dict__, "hold_rounds": 1})
        ev = Balancer(FilteredPlacement(snap.view, snap.specs), rules).evaluate(snap.fleet)
        want = {(p.move.vm_id, p.move.source, p.move.target) for p in ev.proposals}
        got = {(r.vm_id, r.source_host, r.target_host) for r in listed.recommendations}
        assert got == want
        assert all(r.reason.level == "manual" and r.reason.kind == "load" for r in listed.recommendations)
        # an operator runs one: it moves, and leaves the list
        rec = listed.recommendations[0]
        ans = await c.client.endpoint.request(COORDINATOR_QUERY, ApplyRecommendation(recommendation_id=rec.id),
                                              timeout=5.0)
        assert isinstance(ans, Done), ans
        outcome = await c.client.outcome(ans.detail["migration_id"], timeout=30)
        assert outcome.status == "completed"
        assert rec.vm_id in c.coordinator.hosts.placement()[rec.target_host]
        assert rec.id not in {r.id for r in (await recommendations(c.client)).recommendations}


async def test_partial_mode_evacuates_on_a_fault_and_only_recommends_load(bus_kind: str) -> None:
    layout = {"host-a": [(f"vm{i}", 2.0) for i in range(4)], "host-b": [("vm-b1", 0.5), ("vm-b2", 0.5)]}
    async with running(bus_kind, "partial", layout) as (c, s):
        # its own level says manual: the evacuation leaves it there and recommends its move
        await c.create_vm("host-b", "vm-b3", memory_mib=128, sim_instant=True, sim_cpu=0.5, automation_level="manual")
        async def recommended() -> bool:
            return bool((await recommendations(c.client)).recommendations)
        await until(recommended, 30, "a load recommendation")
        assert await entries(c) == []  # load: recommended only
        offered = await recommendation_events(c)
        fault = HostFaultEvent(id="f-1", host="host-b", kind="disk", severity="critical", message="smart failing")
        again = HostFaultEvent(id="f-3", host="host-b", kind="memory", severity="critical", message="ecc errors")
        for ev in (fault, fault, again):  # redelivered, and a second fault while the host drains
            await c.client.endpoint.send(host_event("host-b"), ev)

        async def evacuated() -> bool:
            d = await c.store.drains.latest("host-b")
            return d is not None and not d.open and placement(c, "host-b") == {"vm-b3"}
        await until(evacuated, 60, "host-b to be evacuated")
        [drain] = await c.store.drains.list()  # one drain, whatever the faults
        got = await status(c, "host-b")
        assert got.status == "drained" and got.done == 2 and got.priority == "evacuation"
        assert got.why is not None and (got.why.kind, got.why.policy) == ("fault", "host.fault.disk")
        assert got.unmovable_vms.keys() == {"vm-b3"} and "manual" in got.unmovable_vms["vm-b3"]
        assert drain.requested_by is not None and drain.requested_by.startswith("autonomic")
        es = await entries(c)
        assert sorted(e.vm_id for e in es) == ["vm-b1", "vm-b2"]  # each once
        assert {(e.priority, e.group) for e in es} == {(Priority.EVACUATION, drain.drain_id)}  # no load move
        for e in es:
            rec = await c.store.get(e.migration_id)
            assert rec is not None and rec.status == "completed" and rec.target_host != "host-b"
            assert rec.data["why"]["kind"] == "fault" and rec.data["why"]["level"] == "partial"
            assert rec.data["why"]["policy"] == "host.fault.disk" and rec.data["why"]["detail"] == "smart failing"
        assert any(ev.status == "created" and ev.recommendation.vm_id == "vm-b3" and ev.recommendation.reason.kind
                   == "fault" and ev.recommendation.reason.level == "manual" for ev in offered)
        assert {f"vm{i}" for i in range(4)} <= placement(c, "host-a")  # load: not moved
        assert "host-b" in (await c.coordinator.autonomic.ledger.read()).body["faulty"]  # no VM goes there
        assert "host-b" in await c.store.drains.cordoned()
        resolved = HostFaultEvent(id="f-2", host="host-b", kind="disk", severity="info", detail={"resolved": True})
        await c.client.endpoint.send(host_event("host-b"), resolved)

        async def back() -> bool:
            faulty = (await c.coordinator.autonomic.ledger.read()).body["faulty"]
            return "host-b" not in faulty and "host-b" not in await c.store.drains.cordoned()
        await until(back, 10, "host-b to be given back to the balancer")


async def test_a_vms_embot_asks_for_its_vm_to_move_and_its_counters_move_with_it(bus_kind: str) -> None:
    async with running(bus_kind, "partial", {}) as (c, s):
        doc = load_plane(examples_dir() / "failing-disk.yaml")
        modules = modules_of(doc, lambda key: None)
        g, _ = to_graph(doc, {m.ref().key: m for m in modules}.get)
        await c.create_vm("host-a", "app-01", memory_mib=128, modules=modules, g=g, sim_instant=True)
        for i in range(4):
            await c.client.send_event(VmEvent(id=f"d{i}", vm_id="app-01", element_id="app-01.disk0",
                                              kind="disk.error", ts=1000.0 + i, data={"code": i}))

        async def moved() -> bool:
            loc = c.coordinator.hosts.locate("app-01")
            return loc is not None and loc[0] != "host-a" and all(not e.live for e in await entries(c))
        await until(moved, 60, "app-01 to move off host-a")
        [entry] = await entries(c)
        assert entry.priority == Priority.OPERATOR and entry.state == EntryState.DONE
        rec = await c.store.get(entry.migration_id)
        assert rec is not None and rec.status == "completed"
        assert rec.data["why"]["policy"] == "move-after-disk-errors" and rec.data["why"]["kind"] == "fault"
        # ... and on its trace: the root span carries why
        tracing = installed()
        assert tracing is not None and tracing.bus_exporter is not None

        async def traced() -> bool:
            await tracing.bus_exporter.flush()  # type: ignore[union-attr]
            return any((sp.get("attributes") or {}).get("ferry.why.policy") == "move-after-disk-errors"
                       for sp in await c.client.trace(entry.migration_id))
        await until(traced, 10, "the migration's root span to say why")
        target = c.host(rec.target_host).managed_object

        async def counted() -> bool:
            plane = target.planes.get("app-01")
            return plane is not None and plane.state["app-01.disks"].get("errors") == 4
        await until(counted, 10, "the fourth error counted on the target")
        assert target.planes["app-01"].state["app-01.disks"] == {"errors": 4, "moves_asked": 1}
        assert "app-01" not in c.host("host-a").managed_object.planes


async def test_a_hosts_plane_recommends_on_overload_and_evacuates_for_maintenance(bus_kind: str) -> None:
    # the balancer's own threshold out of reach: the recommendation must come from the plane
    layout = {"host-b": [("vm-b1", 15.0), ("vm-b2", 0.5)]}
    async with running(bus_kind, "partial", layout, rules=replace(FAST_RULES, threshold=5.0)) as (c, s):
        # as ferry plane apply -f examples/host-policies.yaml --vm host.host-b --on host-b
        doc = retarget(load_plane(examples_dir() / "host-policies.yaml"), "host.host-b")
        assert await apply_command(c.client.endpoint, doc, host="host-b") == 0

        async def overload_recommended() -> bool:
            recs = (await recommendations(c.client)).recommendations
            return any(r.reason.policy == "sustained-overload" and r.vm_id == "vm-b1" for r in recs)
        await until(overload_recommended, 30, "the host's plane to recommend moving vm-b1")
        assert await entries(c) == []  # partial: load is only recommended
        announce = HostFaultEvent(id="mw-1", host="host-b", kind="other", severity="info", at=c.clock.now(),
                                  detail={"maintenance_at": c.clock.now() + 300})
        await c.client.endpoint.send(host_event("host-b"), announce)

        async def emptied() -> bool:
            d = await c.store.drains.latest("host-b")
            return d is not None and not d.open and not placement(c, "host-b")
        await until(emptied, 60, "host-b to be emptied for its maintenance")
        got = await status(c, "host-b")
        assert got.status == "drained" and got.done == 2 and got.priority == "drain"
        assert got.why is not None and (got.why.kind, got.why.policy) == ("maintenance", "maintenance-due")
        assert "host-b" in await c.store.drains.cordoned()
        es = await entries(c)
        assert sorted(e.vm_id for e in es) == ["vm-b1", "vm-b2"] and {e.priority for e in es} == {Priority.DRAIN}
        for e in es:
            rec = await c.store.get(e.migration_id)
            assert rec is not None and rec.status == "completed"
            assert rec.data["why"]["kind"] == "maintenance" and rec.data["why"]["policy"] == "maintenance-due"
            assert rec.data["why"]["level"] == "partial"
        state = c.host("host-b").managed_object.planes["host.host-b"].state["host.host-b.reasons"]
        assert state["evacuating"] is True and state["maintenance_at"] == announce.detail["maintenance_at"]


async def test_automatic_work_yields_while_other_work_is_queued(bus_kind: str) -> None:
    async with running(bus_kind, "full", {"host-a": [(f"vm{i}", 2.0) for i in range(6)]}) as (c, s):
        auto = c.coordinator.autonomic
        # an operator's migration waiting in the queue (no host fits it yet): the balancer yields
        held = new_entry("op-1", "vm0", "host-a", [], priority=Priority.OPERATOR, now=c.clock.now(),
                         placement_note="host-b: insufficient memory")
        await c.store.queue.enqueue(held)

        async def yielding() -> bool:
            r = auto.last_round
            return r is not None and r.evaluation.idle == "yielding"
        await until(yielding, 30, "the balancer to yield")
        await asyncio.sleep(1.0)  # several more rounds
        assert [e.migration_id for e in await entries(c)] == ["op-1"]
        await c.store.queue.cancel("op-1", now=c.clock.now())

        async def moving() -> bool:
            return any(e.priority == Priority.REBALANCE for e in await entries(c))
        await until(moving, 30, "the balancer to move once nothing else waits")


async def test_an_operators_drain_pre_empts_queued_automatic_work(bus_kind: str) -> None:
    layout = {"host-a": [(f"vm{i}", 1.0) for i in range(3)], "host-b": [("vm-b1", 1.0)]}
    async with running(bus_kind, "manual", layout) as (c, _):
        # the balancer's moves, queued (held by policy for now): off host-a, and onto it
        auto = [("vm0", "host-a", "host-b"), ("vm1", "host-a", "host-c"), ("vm-b1", "host-b", "host-a")]
        for vm_id, source, target in auto:
            entry = new_entry(f"auto-{vm_id}", vm_id, source, (target,), priority=Priority.REBALANCE,
                              group="rebalance", now=c.clock.now())
            await c.store.queue.enqueue(replace(entry, policy_block="held"))
        ans = await drain(c, "host-a")
        assert isinstance(ans, DrainStatusEvent) and ans.priority == "drain" and ans.why is None, ans
        got = await wait_end(c, "host-a")
        assert got.status == "drained" and got.done == 3 and not placement(c, "host-a")
        assert placement(c, "host-b") >= {"vm-b1"}  # its move onto the drained host never ran
        es = {e.migration_id: e for e in await entries(c)}
        assert {es[f"auto-{v}"].state for v, *_ in auto} == {EntryState.CANCELLED}
        drained = [e for e in es.values() if e.group == got.drain_id]
        assert sorted(e.vm_id for e in drained) == ["vm0", "vm1", "vm2"]  # each once, by the drain
        assert {e.priority for e in drained} == {Priority.DRAIN} and all(e.state is EntryState.DONE for e in drained)
        assert [r.migration_id for r in await c.store.list() if r.migration_id.startswith("auto-")] == []
