"""Every outcome of the saga, on the in-process bus and on the real RabbitMQ, with the
final state checked on every host: exactly one active management plane, where the VM
runs; nothing staged, frozen or reserved; every event dispatched exactly once, in order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from ferry_cli.client import TERMINAL
from ferry_cli.cluster import HostOptions
from ferry_common.bus.topology import host_command, migration_status
from ferry_common.errors import RemoteError
from ferry_common.messages.commands import (
    DispatchEvents,
    FreezeEvents,
    ManagedObjectInstantiationError,
    ManagementEventStateFailed,
    ManagementStateFailed,
    MigrationComplete,
    StageEvents,
)
from ferry_coordinator.saga.run import SagaRun
from ferry_testing.sample import event as sample_event
from tests.harness import FAST, Cluster, inject_answer, inspect_problems, make_cluster, until


def high_samples(c: Cluster, vm_id: str) -> int:
    return sum(1 for e in c.sent[vm_id] if e.kind == "cpu.load" and e.data["value"] > 0.8)


@pytest.fixture
async def cluster(bus_kind: str):
    c = await make_cluster(
        bus_kind,
        options={
            "host-a": HostOptions(inventory_interval_s=0.5),
            "host-b": HostOptions(inventory_interval_s=0.5),
            "host-c": HostOptions(inventory_interval_s=0.5, allowed_sources=("host-b",), capacity_mib=4096),
        },
    )
    yield c
    await c.close()


async def assert_clean(c: Cluster, vm_id: str, where: str) -> None:
    assert await inspect_problems(c, vm_id, where) == []


def gate_saga(
    monkeypatch: pytest.MonkeyPatch,
    gate: Callable[[Any, str], asyncio.Event | None],
    answered: type,
    seen: asyncio.Event,
) -> None:
    """Each request of the saga waits for the event ``gate(msg, service)`` names (None: no
    wait); ``seen`` is set once a request of type ``answered`` was answered."""
    real = SagaRun.call

    async def call(self: SagaRun, host: str, msg: Any, **kw: Any) -> Any:
        held = gate(msg, kw.get("service") or (type(msg).services or ("",))[0])
        if held is not None:
            await held.wait()
        answer = await real(self, host, msg, **kw)
        if isinstance(msg, answered):
            seen.set()
        return answer

    monkeypatch.setattr(SagaRun, "call", call)


def hold_saga(monkeypatch: pytest.MonkeyPatch, held: type, answered: type) -> tuple[asyncio.Event, asyncio.Event]:
    """The saga's request of type ``held`` waits until the test sets ``go``; ``seen`` is set
    once a request of type ``answered`` was answered. Returns (seen, go)."""
    seen, go = asyncio.Event(), asyncio.Event()
    gate_saga(monkeypatch, lambda msg, _: go if isinstance(msg, held) else None, answered, seen)
    return seen, go


# ---- completed ---------------------------------------------------------------------------
async def test_completed_migration_moves_plane_state_and_events(cluster: Cluster) -> None:
    await cluster.create_vm("host-a", "vm1")
    await cluster.send_events("vm1", 12)
    await cluster.settle("vm1")
    before = cluster.host("host-a").managed_object.planes["vm1"].state["vm1.load"]
    assert before["high_samples"] == high_samples(cluster, "vm1") == 3
    outcome = await cluster.migrate("vm1", "host-b")
    assert outcome.status == "completed", outcome
    await cluster.send_events("vm1", 6)
    await assert_clean(cluster, "vm1", "host-b")
    after = cluster.host("host-b").managed_object.planes["vm1"].state["vm1.load"]
    # the policy's counter carried on where it stopped on the source
    assert after["high_samples"] == high_samples(cluster, "vm1") == 5
    assert "sustained-load" in after["alarms"]


async def test_events_queued_during_migration_are_dispatched_on_target_once_in_order(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Events that arrive once the source has frozen them (after the VM was copied), before
    the target's sensor takes the events' key, wait in the source's queue, go to the target,
    and are acted on there once each, in time order, by the policies whose state carried on
    from the source."""
    await cluster.create_vm("host-a", "vm1", memory_mib=512, sim_bandwidth_mibps=1024)  # ~0.5 s
    await cluster.send_events("vm1", 5)
    await cluster.settle("vm1")
    # the target binds the key only when the test says
    frozen, go = hold_saga(monkeypatch, held=StageEvents, answered=FreezeEvents)
    mid = await cluster.client.migrate("vm1", "host-b")
    await asyncio.wait_for(frozen.wait(), 20)
    queued = await cluster.send_events("vm1", 40)  # frozen on the source: queued there
    await asyncio.sleep(0.1)
    go.set()
    outcome = await cluster.client.outcome(mid, timeout=30)
    assert outcome.status == "completed"
    assert outcome.detail["events_moved"] >= 1
    await assert_clean(cluster, "vm1", "host-b")
    on_target = cluster.host("host-b").managed_object.ledger["vm1"]
    assert on_target[: len(queued)] == [e.id for e in queued]  # none stayed behind, none twice
    ts = {e.id: e.ts for e in cluster.sent["vm1"]}
    assert [ts[i] for i in on_target] == sorted(ts[i] for i in on_target)
    after = cluster.host("host-b").managed_object.planes["vm1"].state["vm1.load"]
    assert after["high_samples"] == high_samples(cluster, "vm1")


async def test_a_backlog_that_reaches_the_target_plane_before_its_completion_activates_it(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 7 tells the target's managed object and sensor at once. Here the managed object's
    MigrationComplete waits until the sensor has dispatched the backlog: the dispatch names
    the migration that made the host the owner, so the staged plane takes it as that
    completion, acts on every event once, in order, and nothing is refused or dead-lettered;
    the managed object's own MigrationComplete, when it comes, finds the work done."""
    await cluster.create_vm("host-a", "vm1", memory_mib=512, sim_bandwidth_mibps=1024)
    await cluster.send_events("vm1", 5)
    await cluster.settle("vm1")
    frozen, stage = asyncio.Event(), asyncio.Event()
    release = asyncio.Event()
    target = cluster.host("host-b")

    def gate(msg: Any, service: str) -> asyncio.Event | None:
        if isinstance(msg, StageEvents):
            return stage
        if isinstance(msg, MigrationComplete) and service == "managed_object":
            return release
        return None

    gate_saga(monkeypatch, gate, FreezeEvents, frozen)
    mid = await cluster.client.migrate("vm1", "host-b")
    await asyncio.wait_for(frozen.wait(), 20)
    queued = await cluster.send_events("vm1", 40)  # frozen on the source: the backlog
    await asyncio.sleep(0.1)
    stage.set()
    # the sensor drains the backlog while the managed object has not heard of the completion
    async def acted() -> bool:
        return len(target.managed_object.ledger.get("vm1", [])) >= len(queued)

    await until(acted, 20,
                "the backlog acted on by the target before its managed object heard of the completion")
    plane = target.managed_object.planes["vm1"]
    assert (plane.status, plane.migration_id) == ("active", None)
    assert plane.epoch >= 1
    release.set()
    outcome = await cluster.client.outcome(mid, timeout=30)
    assert outcome.status == "completed", outcome
    assert target.managed_object.planes["vm1"].epoch == plane.epoch
    await assert_clean(cluster, "vm1", "host-b")
    on_target = target.managed_object.ledger["vm1"]
    assert on_target[: len(queued)] == [e.id for e in queued]
    assert target.managed_object.endpoint.stats["dead_lettered"] == 0
    assert target.sensor.endpoint.stats["dead_lettered"] == 0


async def test_a_dispatch_from_another_sender_does_not_activate_a_staged_plane(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the target's own sensor may stand in for step 7: a DispatchEvents naming the
    migration but sent by anyone else is refused (dead-lettered, the sender told), and the
    plane stays staged until the saga's MigrationComplete."""
    await cluster.create_vm("host-a", "vm1", memory_mib=512, sim_bandwidth_mibps=1024)
    await cluster.settle("vm1")
    reached, release = asyncio.Event(), asyncio.Event()
    target = cluster.host("host-b")
    real = SagaRun.call

    async def call(self: SagaRun, host: str, msg: Any, **kw: Any) -> Any:
        if isinstance(msg, MigrationComplete):
            reached.set()
            await release.wait()
        return await real(self, host, msg, **kw)

    monkeypatch.setattr(SagaRun, "call", call)
    mid = await cluster.client.migrate("vm1", "host-b")
    await asyncio.wait_for(reached.wait(), 20)
    forged = DispatchEvents(vm_id="vm1", events=[sample_event("vm1", 999, 1.0)], completed_by=mid, epoch=99)
    refused = target.managed_object.endpoint.stats["dead_lettered"]
    with pytest.raises(RemoteError, match="staged"):
        await cluster.client.endpoint.request(host_command("host-b", "managed_object"), forged, timeout=5)
    assert target.managed_object.endpoint.stats["dead_lettered"] == refused + 1
    assert target.managed_object.planes["vm1"].status == "staged"
    release.set()
    outcome = await cluster.client.outcome(mid, timeout=30)
    assert outcome.status == "completed", outcome
    assert target.managed_object.planes["vm1"].epoch != 99
    await assert_clean(cluster, "vm1", "host-b")


async def test_events_reaching_both_hosts_around_the_freeze_act_once(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The target's sensor takes the events' key beside the source's freeze: events that
    arrive between the two reach both hosts; the source acts on them, the target queues them
    too, and skips them at dispatch (their ids came in the final dirty round)."""
    await cluster.create_vm("host-a", "vm1", memory_mib=512, sim_bandwidth_mibps=1024)
    await cluster.send_events("vm1", 5)
    await cluster.settle("vm1")
    # the source freezes only when the test says
    staged, go = hold_saga(monkeypatch, held=FreezeEvents, answered=StageEvents)
    mid = await cluster.client.migrate("vm1", "host-b")
    await asyncio.wait_for(staged.wait(), 20)
    both = await cluster.send_events("vm1", 30)  # bound on both hosts, the source still active
    source = cluster.host("host-a").managed_object

    async def acted() -> bool:
        return all(e.id in source.ledger["vm1"] for e in both)
    await until(acted, 10, "the source to act on the events that reached both hosts")
    go.set()
    outcome = await cluster.client.outcome(mid, timeout=30)
    assert outcome.status == "completed", outcome
    later = await cluster.send_events("vm1", 5)
    await assert_clean(cluster, "vm1", "host-b")
    on_target = cluster.host("host-b").managed_object.ledger["vm1"]
    assert not set(on_target) & {e.id for e in both}  # the target held them, and skipped them
    assert on_target[-len(later):] == [e.id for e in later]
    after = cluster.host("host-b").managed_object.planes["vm1"].state["vm1.load"]
    assert after["seen"] == sum(1 for e in cluster.sent["vm1"] if e.element_id == "vm1")


async def test_events_while_the_vm_precopies_act_on_the_source_and_their_state_moves(cluster: Cluster) -> None:
    """The source acts on events until it freezes them, after the VM was copied: what they
    changed reaches the target in dirty rounds, and their ids in its dedup window, so a
    producer's resend after the move does not act twice."""
    await cluster.create_vm("host-a", "vm1", memory_mib=512, sim_bandwidth_mibps=1024)  # ~0.5 s
    await cluster.send_events("vm1", 5)
    await cluster.settle("vm1")
    mid = await cluster.client.migrate("vm1", "host-b")

    async def precopying() -> bool:
        rec = await cluster.store.get(mid)
        return rec is not None and rec.step == "migrate_vm"

    await until(precopying, 20, "the VM migration to start")
    during = []
    for _ in range(6):
        during += await cluster.send_events("vm1", 5)
        await asyncio.sleep(0.05)
    outcome = await cluster.client.outcome(mid, timeout=30)
    assert outcome.status == "completed", outcome
    source_ledger = cluster.host("host-a").managed_object.ledger["vm1"]
    acted_on_source = [e for e in during if e.id in source_ledger]
    assert acted_on_source, "no event was acted on at the source while the VM pre-copied"
    rec = await cluster.store.get(mid)
    assert rec is not None and rec.data["dirty_applied"] + rec.data["final_dirty_applied"] >= 1
    # a collector resends what the source acted on: the target knows those ids
    await cluster.client.send_batch("vm1", acted_on_source)
    await cluster.send_events("vm1", 3)
    await assert_clean(cluster, "vm1", "host-b")
    target_ledger = cluster.host("host-b").managed_object.ledger["vm1"]
    assert not {e.id for e in acted_on_source} & set(target_ledger)
    after = cluster.host("host-b").managed_object.planes["vm1"].state["vm1.load"]
    assert after["high_samples"] == high_samples(cluster, "vm1")


async def test_target_fetches_missing_modules_recursively(cluster: Cluster) -> None:
    await cluster.create_vm("host-a", "vm1")
    assert cluster.host("host-b").managed_object.modules.refs() == []
    outcome = await cluster.migrate("vm1", "host-b")
    assert outcome.status == "completed"
    rec = await cluster.store.get(outcome.migration_id)
    assert rec is not None
    # ferry.metrics is named by no element: it came in as ferry.load's dependency, in the same
    # round (the source sends what a requested module depends on along with it)
    assert rec.data["modules_fetched"][-1] == "ferry.metrics@2.1"
    assert sum(1 for h in rec.history if h.event == "retry") == 0
    assert rec.data["module_rounds"] == 1
    assert {r.key for r in cluster.host("host-b").managed_object.modules.refs()} == {
        "ferry.core@1.0", "ferry.metrics@2.1", "ferry.load@1.3"}


async def test_a_module_missing_on_both_hosts_rolls_back_as_an_instantiation_error(cluster: Cluster) -> None:
    """The target asks the source for the modules it lacks, host to host; a dependency the
    source no longer has either ends the transfer with an instantiation error, answered to
    the saga by the source, and the migration rolls back."""
    await cluster.create_vm("host-a", "vm1")
    await cluster.send_events("vm1", 4)
    del cluster.host("host-a").managed_object.modules._modules["ferry.metrics@2.1"]
    outcome = await cluster.migrate("vm1", "host-b")
    assert (outcome.status, outcome.code, outcome.step) == ("rolled_back", "instantiation_error", "management_state")
    assert "modules unknown on both hosts: ferry.metrics@2.1" in (outcome.reason or "")
    await assert_clean(cluster, "vm1", "host-a")


async def test_the_same_migration_id_twice_starts_one_migration(cluster: Cluster) -> None:
    await cluster.create_vm("host-a", "vm1")
    await cluster.client.migrate("vm1", "host-b", migration_id="m-twice")
    await cluster.client.migrate("vm1", "host-b", migration_id="m-twice")
    outcome = await cluster.client.outcome("m-twice", timeout=30)
    assert outcome.status == "completed"
    rows = await cluster.client.migrations("vm1")
    assert [r["migration_id"] for r in rows] == ["m-twice"]
    await assert_clean(cluster, "vm1", "host-b")


# ---- rejected at once ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("vm", "target", "code"),
    [("nope", "host-b", "unknown_vm"), ("vm1", "host-z", "unknown_host"), ("vm1", "host-a", "same_host")],
)
async def test_rejected(cluster: Cluster, vm: str, target: str, code: str) -> None:
    await cluster.create_vm("host-a", "vm1")
    outcome = await cluster.migrate(vm, target)
    assert (outcome.status, outcome.code) == ("rejected", code)
    assert outcome.reason
    await assert_clean(cluster, "vm1", "host-a")


async def test_rejected_when_already_migrating_names_the_running_migration(cluster: Cluster) -> None:
    await cluster.create_vm("host-a", "vm1", memory_mib=1024, sim_bandwidth_mibps=1024)  # ~1 s
    first = await cluster.client.migrate("vm1", "host-b")
    second = await cluster.migrate("vm1", "host-b")
    assert (second.status, second.code, second.running_migration_id) == ("rejected", "already_migrating", first)
    assert (await cluster.client.outcome(first, timeout=30)).status == "completed"
    await assert_clean(cluster, "vm1", "host-b")


@pytest.mark.parametrize(("memory", "code"), [(1024, "source_not_allowed"), (8192, "insufficient_resources")])
async def test_denied_by_admission(cluster: Cluster, memory: int, code: str) -> None:
    # host-c takes VMs only from host-b, and has 4 GiB
    source = "host-a" if code == "source_not_allowed" else "host-b"
    await cluster.create_vm(source, "vm1", memory_mib=memory)
    await cluster.send_events("vm1", 5)
    outcome = await cluster.migrate("vm1", "host-c")
    assert (outcome.status, outcome.code) == ("rejected", code)
    await assert_clean(cluster, "vm1", source)


# ---- failure answers: rolled back ----------------------------------------------------------
FAILURES = [
    ("managed_object", "ManagementState", ManagementStateFailed(reason="cannot deserialize"), "management_state_failed"),
    ("managed_object", "ManagementState", ManagedObjectInstantiationError(reason="no such type"), "instantiation_error"),
    ("sensor", "ManagementEventState", ManagementEventStateFailed(reason="bad queue"), "event_state_failed"),
    ("sensor", "ManagementEventState", ManagedObjectInstantiationError(reason="no element"), "instantiation_error"),
    ("managed_object", "MigrationState", ManagementStateFailed(reason="dirty object rejected"), "migration_state_failed"),
]


@pytest.mark.parametrize(("service", "mtype", "answer", "code"), FAILURES, ids=[f[1] + ":" + f[3] for f in FAILURES])
async def test_failure_answer_rolls_back(cluster: Cluster, service: str, mtype: str, answer: object, code: str) -> None:
    await cluster.create_vm("host-a", "vm1", memory_mib=512, sim_bandwidth_mibps=1024)
    await cluster.send_events("vm1", 8)
    inject_answer(cluster.host("host-b"), service, mtype, answer)
    mid = await cluster.client.migrate("vm1", "host-b")
    if mtype == "MigrationState":  # step 6 only runs with something dirty
        await asyncio.sleep(0.2)
        await cluster.client.set_attributes("host-a", "vm1", "vm1.nic0", {"mtu": 9000})
    await cluster.send_events("vm1", 8)
    outcome = await cluster.client.outcome(mid, timeout=30)
    assert (outcome.status, outcome.code) == ("rolled_back", code), outcome
    await cluster.send_events("vm1", 4)
    await assert_clean(cluster, "vm1", "host-a")
    state = cluster.host("host-a").managed_object.planes["vm1"].state["vm1.load"]
    assert state["high_samples"] == high_samples(cluster, "vm1")


async def test_a_client_can_watch_the_outcomes_alone(bus_kind: str) -> None:
    """``watch(TERMINAL)``: the outcome arrives and nothing else is routed to the client."""
    c = await make_cluster(bus_kind, ("host-a", "host-b"), watch=TERMINAL)
    try:
        await c.create_vm("host-a", "vm1", memory_mib=512, sim_bandwidth_mibps=1024)  # ~0.5 s: progress on the way
        outcome = await c.migrate("vm1", "host-b")
        assert outcome.status == "completed", outcome
        assert {e.status for e in c.client._history} == {"completed"}
    finally:
        await c.close()


async def test_a_migrations_step_statuses_are_paced(bus_kind: str) -> None:
    """At most one progress status per ``progress_interval_s`` (the newest waits; the outcome
    supersedes one still waiting); with 0, one at the start of (nearly) every step."""
    seen: dict[float, tuple[int, float]] = {}
    for interval in (0.0, 1.0):
        c = await make_cluster(bus_kind, ("host-a", "host-b"), timeouts=replace(FAST, progress_interval_s=interval))
        try:
            await c.create_vm("host-a", "vm1", memory_mib=512, sim_bandwidth_mibps=1024)  # ~0.5 s
            t0 = time.monotonic()
            outcome = await c.migrate("vm1", "host-b")
            took = time.monotonic() - t0
            assert outcome.status == "completed", outcome
            # the saga's own (the source adapter's hypervisor samples carry figures)
            steps = [e for e in c.client._history if e.status == "progress" and "percent" not in e.detail]
            seen[interval] = (len(steps), took)
        finally:
            await c.close()
    every, _ = seen[0.0]
    paced, took = seen[1.0]
    assert every >= 3, seen  # eight steps, a fast one's replaced by the next while one is on its way
    assert paced <= 1 + int(took / 1.0), seen


async def test_progress_samples_held_by_the_broker_do_not_hold_the_migration(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source adapter's progress samples go beside the driver's watch: with every one
    held on its way, the migration still completes (a held sample used to stop the watch,
    its timeouts and the notice that the migration ended)."""
    adapter = cluster.host("host-a").adapter
    held, release = asyncio.Event(), asyncio.Event()
    real = adapter.endpoint.send

    async def send(key: str, msg: Any, **kw: Any) -> None:
        if key == migration_status("progress") and getattr(msg, "step", None) == "migrate_vm":
            held.set()
            await release.wait()
        await real(key, msg, **kw)

    monkeypatch.setattr(adapter.endpoint, "send", send)
    await cluster.create_vm("host-a", "vm1", memory_mib=512, sim_bandwidth_mibps=1024)  # ~0.5 s
    await cluster.send_events("vm1", 8)
    try:
        outcome = await asyncio.wait_for(cluster.migrate("vm1", "host-b"), 30)
        assert held.is_set(), "the driver sent no progress sample"
        assert outcome.status == "completed", outcome
        await assert_clean(cluster, "vm1", "host-b")
    finally:
        release.set()


async def _migrate_failing(cluster: Cluster, sim_fail: str, *, events: int = 8) -> Any:
    """vm1 (256 MiB, whose sim driver fails at ``sim_fail``) asked from host-a to host-b."""
    await cluster.create_vm("host-a", "vm1", memory_mib=256, sim_fail=sim_fail)
    if events:
        await cluster.send_events("vm1", events)
    return await cluster.migrate("vm1", "host-b")


async def test_vm_migration_failure_rolls_back(cluster: Cluster) -> None:
    outcome = await _migrate_failing(cluster, "migrate")
    assert (outcome.status, outcome.code) == ("rolled_back", "vm_migration_failed")
    await assert_clean(cluster, "vm1", "host-a")


async def test_a_guest_that_is_not_running_on_the_source_is_not_migrated(cluster: Cluster) -> None:
    # paused by its operator after the request was accepted: the source adapter's driver
    # refuses it, and the saga rolls back with the guest still paused where it was
    await cluster.create_vm("host-a", "vm1", memory_mib=256)
    await cluster.send_events("vm1", 8)
    cluster.host("host-a").adapter.driver.vms["vm1"].state = "paused"
    outcome = await cluster.migrate("vm1", "host-b")
    assert (outcome.status, outcome.code) == ("rolled_back", "vm_migration_failed"), outcome
    assert "not running" in (outcome.reason or "")
    assert await cluster.host("host-a").adapter.driver.state("vm1") == "paused"
    assert await cluster.host("host-b").adapter.driver.state("vm1") == "absent"
    cluster.host("host-a").adapter.driver.vms["vm1"].state = "running"
    await assert_clean(cluster, "vm1", "host-a")


async def test_target_that_cannot_start_the_guest_rolls_back(cluster: Cluster) -> None:
    outcome = await _migrate_failing(cluster, "incoming", events=0)
    assert (outcome.status, outcome.code) == ("rolled_back", "incoming_failed")
    await assert_clean(cluster, "vm1", "host-a")


async def test_guest_not_running_on_target_after_migration_rolls_back(cluster: Cluster) -> None:
    outcome = await _migrate_failing(cluster, "finish")
    assert (outcome.status, outcome.code) == ("rolled_back", "not_running")
    await assert_clean(cluster, "vm1", "host-a")


async def test_operator_cancel_rolls_back(cluster: Cluster) -> None:
    await cluster.create_vm("host-a", "vm1", memory_mib=4096, sim_bandwidth_mibps=1024)  # ~4 s
    await cluster.send_events("vm1", 8)
    mid = await cluster.client.migrate("vm1", "host-b")
    async for event in cluster.client.follow(mid, timeout=30):
        if event.step == "migrate_vm":
            break
    await cluster.send_events("vm1", 8)
    await cluster.client.cancel(mid, "changed my mind")
    outcome = await cluster.client.outcome(mid, timeout=30)
    assert (outcome.status, outcome.code) == ("rolled_back", "cancelled")
    await assert_clean(cluster, "vm1", "host-a")


# ---- timeouts at every wait: the target service is stopped ---------------------------------
WAITS = [
    ("host-b", "migration_policy", "admission"),
    ("host-b", "managed_object", "management_state"),
    ("host-b", "sensor", "freeze_events"),  # it takes the events' key beside the freeze
    ("host-b", "hypervisor_adapter", "migrate_vm"),
]


@pytest.mark.parametrize(("host", "service", "step"), WAITS, ids=[w[2] for w in WAITS])
async def test_timeout_at_each_wait_rolls_back(cluster: Cluster, host: str, service: str, step: str) -> None:
    await cluster.create_vm("host-a", "vm1", memory_mib=256)
    await cluster.send_events("vm1", 8)
    await cluster.host(host).stop((service,))
    outcome = await cluster.migrate("vm1", "host-b")
    assert (outcome.status, outcome.code, outcome.step) == ("rolled_back", "timeout", step), outcome
    await cluster.send_events("vm1", 4)
    # the stopped service comes back and works through what queued up for it, clean-up last
    await cluster.host(host).services[service].start()
    await asyncio.sleep(0.3)
    await assert_clean(cluster, "vm1", "host-a")


async def test_source_sensor_stopped_at_freeze_rolls_back_once_it_returns(cluster: Cluster) -> None:
    await cluster.create_vm("host-a", "vm1", memory_mib=256)
    await cluster.send_events("vm1", 8)
    await cluster.settle("vm1")
    await cluster.host("host-a").stop(("sensor",))
    mid = await cluster.client.migrate("vm1", "host-b")
    await asyncio.sleep(3.0)  # freeze times out; the source clean-up waits for the sensor
    await cluster.host("host-a").services["sensor"].start()
    outcome = await cluster.client.outcome(mid, timeout=30)
    assert (outcome.status, outcome.code, outcome.step) == ("rolled_back", "timeout", "freeze_events")
    await assert_clean(cluster, "vm1", "host-a")


async def test_a_flood_of_events_during_migration_loses_nothing(cluster: Cluster) -> None:
    """Events dispatched just before the freeze still act on the source and move as state."""
    await cluster.create_vm("host-a", "vm1", memory_mib=256, sim_bandwidth_mibps=1024)
    stop = asyncio.Event()

    async def flood() -> None:
        while not stop.is_set():
            await cluster.send_events("vm1", 20)
            await asyncio.sleep(0)

    producer = asyncio.create_task(flood())
    await asyncio.sleep(0.2)
    outcome = await cluster.migrate("vm1", "host-b")
    await asyncio.sleep(0.2)
    stop.set()
    await producer
    assert outcome.status == "completed"
    assert await inspect_problems(cluster, "vm1", "host-b") == []
    for bus in cluster.buses:
        assert not getattr(bus, "dead_letters", []), [m.headers for m in bus.dead_letters]  # type: ignore[attr-defined]
    state = cluster.host("host-b").managed_object.planes["vm1"].state["vm1.load"]
    assert state["high_samples"] == high_samples(cluster, "vm1")
