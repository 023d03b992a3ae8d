"""The drain manager's passes against the in-process store, with the moments a replica can
die at made to happen: nothing is asked for twice, and what was lost is asked for again."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ferry_common.clock import FakeClock
from ferry_common.messages.domain import VmSpec
from ferry_common.messages.drains import DrainRequest, DrainStatusEvent
from ferry_common.messages.public import HostInventory
from ferry_common.messages.recommendations import MoveReason
from ferry_coordinator.fleet.drain import DrainState, VmState
from ferry_coordinator.fleet.drain_manager import DrainManager
from ferry_coordinator.fleet.queue import EntryState, Priority, QueueEntry, new_entry
from ferry_coordinator.hosts import HostRegistry
from ferry_coordinator.store import MemorySagaStore, SagaRecord


def registry() -> HostRegistry:
    hosts = HostRegistry()
    vms = [VmSpec(vm_id=f"vm{i}", memory_mib=512) for i in range(3)]
    hosts.update(HostInventory(host="host-a", vms=vms, capacity_mib=8192), 0.0)
    for h in ("host-b", "host-c"):
        hosts.update(HostInventory(host=h, capacity_mib=4096), 0.0)
    return hosts


def manager(store: MemorySagaStore, hosts: HostRegistry, sent: list[Any]) -> DrainManager:
    async def publish(key: str, event: Any) -> None:
        sent.append((key, event))

    m = DrainManager(store, hosts, FakeClock(), publish)
    m._warm.set()  # the fleet is known: no warm-up in these tests
    return m


async def test_a_replica_dying_between_its_save_and_its_enqueue_loses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    store, hosts = MemorySagaStore(), registry()
    sent: list[Any] = []
    first = manager(store, hosts, sent)
    real = store.drains.enqueue

    async def dies(drain_id: str, entry: Any) -> Any:
        raise ConnectionError("killed")

    monkeypatch.setattr(store.drains, "enqueue", dies)
    with pytest.raises(ConnectionError):
        await first.request(DrainRequest(host="host-a"), "d1", "client/test")
    saved = await store.drains.get("d1")
    assert saved is not None and {v.state for v in saved.vms.values()} == {VmState.QUEUED}
    assert await store.queue.entries() == []  # saved as queued, never enqueued
    monkeypatch.setattr(store.drains, "enqueue", real)
    second = manager(store, hosts, sent)
    for _ in range(3):
        await second.tick()
    ids = [e.migration_id for e in await store.queue.entries()]
    assert sorted(ids) == ["drain.d1.vm0.1", "drain.d1.vm1.1", "drain.d1.vm2.1"]


async def test_replicas_passing_at_once_ask_for_each_migration_once() -> None:
    store, hosts = MemorySagaStore(), registry()
    sent: list[Any] = []
    replicas = [manager(store, hosts, sent) for _ in range(3)]
    ans = await replicas[0].request(DrainRequest(host="host-a"), "d1", None)
    assert isinstance(ans, DrainStatusEvent) and ans.total == 3
    for _ in range(5):
        await asyncio.gather(*(r.tick() for r in replicas))
    entries = await store.queue.entries()
    assert sorted(e.migration_id for e in entries) == ["drain.d1.vm0.1", "drain.d1.vm1.1", "drain.d1.vm2.1"]
    assert all(e.group == "d1" and "host-a" not in e.candidates for e in entries)
    assert sent and all(key == "host.host-a.drain.draining" for key, _ in sent)


async def test_a_rolled_back_migration_is_asked_for_again_elsewhere() -> None:
    store, hosts = MemorySagaStore(), registry()
    sent: list[Any] = []
    m = manager(store, hosts, sent)
    await m.request(DrainRequest(host="host-a", max_attempts=2), "d1", None)
    entry = await store.queue.get("drain.d1.vm0.1")
    assert entry is not None
    started = await store.queue.claim_next("test", now=1.0)
    assert started is not None
    mid, target = started.migration_id, started.target_host
    assert target is not None
    await store.create(SagaRecord(migration_id=mid, vm_id=started.vm_id, source_host="host-a", target_host=target,
                                  status="rolled_back", created_at=1.0, updated_at=2.0))
    await m.tick()
    again = await store.queue.get(mid[:-1] + "2")
    assert again is not None and target not in again.candidates and again.candidates
    d = await store.drains.get("d1")
    assert d is not None and d.vms[started.vm_id].tried == [target]


async def test_an_evacuation_leaves_the_vms_asked_to_stay_and_says_why_on_each_migration() -> None:
    store, hosts = MemorySagaStore(), registry()
    sent: list[Any] = []
    m = manager(store, hosts, sent)
    fault = MoveReason(kind="fault", policy="host.fault.disk", level="partial", detail="smart failing")
    own = MoveReason(kind="fault", policy="host.fault.disk", level="full")
    ans = await m.request(DrainRequest(host="host-a", priority="evacuation", why=fault, leave={"vm2": "manual"}),
                          "d1", "autonomic", {"vm1": own})
    assert isinstance(ans, DrainStatusEvent) and ans.priority == "evacuation" and ans.why == fault
    assert ans.unmovable_vms == {"vm2": "manual"}
    entries = {e.vm_id: e for e in await store.queue.entries()}
    assert entries.keys() == {"vm0", "vm1"} and {e.priority for e in entries.values()} == {Priority.EVACUATION}
    assert entries["vm0"].request["why"] == fault.model_dump(mode="json")
    assert entries["vm1"].request["why"]["level"] == "full"
    d = await store.drains.get("d1")
    assert d is not None
    for vm in ("vm0", "vm1"):  # both left: the one asked to stay does not fail the drain
        d.vms[vm].state = VmState.DONE
    assert d.outcome() == (DrainState.DRAINED, "left as asked: vm2")


async def test_a_drain_pre_empts_the_queued_automatic_moves_off_or_onto_its_host() -> None:
    store, hosts = MemorySagaStore(), registry()
    m = manager(store, hosts, [])
    for mid, vm, source, target, priority in [("a0", "vm0", "host-a", "host-b", Priority.REBALANCE),
                                              ("a1", "vx", "host-b", "host-a", Priority.REBALANCE),
                                              ("a2", "vy", "host-b", "host-c", Priority.REBALANCE),
                                              ("o1", "vz", "host-c", "host-a", Priority.OPERATOR)]:
        await store.queue.enqueue(new_entry(mid, vm, source, (target,), priority=priority, now=0.0))
    await m.request(DrainRequest(host="host-a"), "d1", None)
    state = {e.migration_id: e.state for e in await store.queue.entries()}
    assert state["a0"] is state["a1"] is EntryState.CANCELLED  # automatic, off host-a or onto it
    assert state["a2"] is state["o1"] is EntryState.QUEUED  # elsewhere, or an operator's
    assert state["drain.d1.vm0.1"] is EntryState.QUEUED


async def test_a_queued_entry_left_without_targets_is_placed_again() -> None:
    """Placed while no host looked ready (a new replica before the inventories, the broker
    down): once they are, the entry gets its targets back instead of waiting for ever."""
    store, hosts = MemorySagaStore(), registry()
    m = manager(store, hosts, [])
    await m.request(DrainRequest(host="host-a"), "d1", None)
    for e in await store.queue.entries():
        await store.queue.update_queued(e.migration_id, candidates=(), placement_note="host-b: not ready")
    await m.tick()
    entries = await store.queue.entries()
    assert len(entries) == 3 and all(e.candidates and "host-a" not in e.candidates for e in entries), entries


async def test_a_vm_that_arrives_while_its_host_drains_leaves_too() -> None:
    """Its migration was under way to host-a when the drain began (another drain's, say): it
    lands after the plan, and the drain asks for its move too instead of ending without it."""
    store, hosts = MemorySagaStore(), registry()
    m = manager(store, hosts, [])
    await m.request(DrainRequest(host="host-a"), "d1", None)
    vms = [VmSpec(vm_id=f"vm{i}", memory_mib=512) for i in range(3)] + [VmSpec(vm_id="late", memory_mib=512)]
    hosts.update(HostInventory(host="host-a", vms=vms, capacity_mib=8192), 1.0)
    await m.tick()
    d = await store.drains.get("d1")
    assert d is not None and d.active and d.vms["late"].state is VmState.QUEUED
    assert await store.queue.get("drain.d1.late.1") is not None


async def rolled_back_once() -> tuple[MemorySagaStore, HostRegistry, DrainManager, QueueEntry]:
    """A drain of host-a whose first migration has rolled back."""
    store, hosts = MemorySagaStore(), registry()
    m = manager(store, hosts, [])
    await m.request(DrainRequest(host="host-a"), "d1", None)
    started = await store.queue.claim_next("test", now=1.0)
    assert started is not None and started.target_host is not None
    await store.create(SagaRecord(migration_id=started.migration_id, vm_id=started.vm_id, source_host="host-a",
                                  target_host=started.target_host, status="rolled_back", created_at=1.0, updated_at=2.0))
    return store, hosts, m, started


async def test_a_retry_waits_while_every_other_host_is_silent() -> None:
    """The broker away: every heartbeat lapses and a migration rolls back. Its retry finds no
    ready host; that is no reason to fail the VM, whose next attempt goes once hosts are back."""
    store, hosts, m, started = await rolled_back_once()
    m.ready = lambda: {"host-a": False, "host-b": False, "host-c": False}
    await m.tick()
    d = await store.drains.get("d1")
    assert d is not None and d.vms[started.vm_id].state is VmState.PENDING, d.vms[started.vm_id]
    m.ready = lambda: {"host-a": True, "host-b": True, "host-c": True}
    await m.tick()
    d = await store.drains.get("d1")
    assert d is not None and d.vms[started.vm_id].state is VmState.QUEUED and d.vms[started.vm_id].attempt == 2


async def test_a_rolled_back_vm_the_target_still_lists_is_not_taken_for_gone() -> None:
    """After a rollback the target's inventory may list the VM a while longer; the drain host
    still runs it, so it is retried, not counted as left (it would stay on a drained host)."""
    store, hosts, m, started = await rolled_back_once()
    hosts.update(HostInventory(host=started.target_host, vms=[VmSpec(vm_id=started.vm_id, memory_mib=512)],
                               capacity_mib=4096), 1.0)
    hosts.hosts["host-a"] = hosts.hosts.pop("host-a")  # locate finds the target's listing first
    assert hosts.locate(started.vm_id)[0] == started.target_host  # type: ignore[index]
    await m.tick()
    d = await store.drains.get("d1")
    assert d is not None and d.vms[started.vm_id].state is VmState.QUEUED and d.vms[started.vm_id].attempt == 2
