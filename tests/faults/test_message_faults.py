"""Lost, duplicated and delayed messages at every saga step, injected in-process by a
:class:`FaultyBus` around the harness's MemoryBus: requests and their answers, events and
the sensor's dispatches. While the VM migrates, the source's VM element keeps changing
(dirty objects) and events keep coming; afterwards the target must hold the last change,
every invariant, and the policy state of a single-host run."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

import tests.harness as harness
from ferry_common.bus.interfaces import QueueSpec
from ferry_common.bus.memory import MemoryBus
from ferry_coordinator.saga import STEPS
from ferry_coordinator.timeouts import SagaTimeouts
from ferry_testing.sample import graph
from ferry_testing.verify import inspect_all, replay, state_problems
from tests.faults.faulty_bus import FaultyBus, Rule
from tests.faults.report import RESULTS, Case
from tests.harness import Cluster, inspect_problems, make_cluster

SOAK = os.environ.get("FERRY_SOAK") == "1"
TIMEOUTS = SagaTimeouts(reply_s=0.4, attempts=3, status_poll_s=0.3, forward_retry_s=0.05,
                        forward_retry_max_s=0.3, lease_s=5.0)
STEP_TYPES: dict[str, tuple[str, ...]] = {
    "admission": ("StartMigration",),
    "freeze_events": ("FreezeEvents", "StageEvents"),
    "management_state": ("ExportManagementState", "ManagementState", "FetchModules"),
    "event_state": ("SendEventState", "ManagementEventState", "ExportDirtyObjects"),
    "migrate_vm": ("PrepareIncoming", "PerformMigration", "ExportDirtyObjects", "MigrationState"),
    "switch_over": ("FinishIncoming",),
    "complete": ("MigrationComplete", "CommitReservation"),
    "teardown": ("SourceTeardown",),
    "compensate": ("CleanupTarget", "CleanupSource"),
}
FAULTS = ("drop request", "drop reply", "duplicate request", "duplicate reply", "delay request", "delay reply")


def rules_for(fault: str, step: str) -> list[Rule]:
    """One rule per message type of ``step``: each type's first message (or answer) is hit."""
    action, what = fault.split()
    return [Rule(action=action, types=(t,), reply=what == "reply", times=1,  # type: ignore[arg-type]
                 delay_s=TIMEOUTS.reply_s * 1.5, label=fault) for t in STEP_TYPES[step]]


def _matrix() -> list[tuple[str, str]]:
    return [(f, s) for s in STEP_TYPES for f in FAULTS]


@pytest.fixture
async def faulty(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Cluster, FaultyBus]]:
    made: list[FaultyBus] = []

    def bus() -> FaultyBus:
        made.append(FaultyBus(MemoryBus()))
        return made[-1]

    monkeypatch.setattr(harness, "MemoryBus", bus)
    c = await make_cluster("memory", ("host-a", "host-b"), timeouts=TIMEOUTS)
    yield c, made[0]
    made[0].disarm()
    await made[0].drain()
    await c.close()


async def _changes(c: Cluster, host: str, vm: str, stop: asyncio.Event, last: list[int]) -> None:
    """Keep changing the VM element on the source (dirty objects) until the plane leaves."""
    n = 0
    while not stop.is_set():
        n += 1
        try:
            await c.client.set_attributes(host, vm, vm, {"generation": n})
            last[0] = n
        except Exception:
            return  # sealed or gone: no more changes are accepted
        await asyncio.sleep(0.02)


async def _events(c: Cluster, vm: str, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await c.send_events(vm, 1)
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(("fault", "step"), _matrix())
async def test_message_fault_at_step(faulty: tuple[Cluster, FaultyBus], fault: str, step: str) -> None:
    c, bus = faulty
    vm = "vm1"
    # the guest does not start on the target (FinishIncoming): the roll-back comes after the
    # source froze and the target staged everything, so the clean-up has the most to undo
    fail = {"sim_fail": "finish"} if step == "compensate" else {}
    await c.create_vm("host-a", vm, memory_mib=256, sim_bandwidth_mibps=512, **fail)
    await c.send_events(vm, 10)
    for rule in rules_for(fault, step):
        bus.arm(rule)
    stop = asyncio.Event()
    last = [0]
    feeders = [asyncio.create_task(_events(c, vm, stop)), asyncio.create_task(_changes(c, "host-a", vm, stop, last))]
    case = Case(f"{fault} (in-process)", step, "unknown")
    try:
        out = await c.migrate(vm, "host-b", timeout=60)
        case.outcome = out.status
        stop.set()
        await asyncio.gather(*feeders)
        hit = sum(r.hits for r in bus.rules)
        bus.disarm()
        await bus.drain()
        rec = await c.store.get(out.migration_id)
        assert rec is not None
        case.step = step if hit else "(not hit)"
        case.detail = f"{hit} messages hit"
        await c.send_events(vm, 5)
        where = "host-b" if out.status == "completed" else "host-a"
        case.violations = await inspect_problems(c, vm, where)
        seen = await inspect_all(c.client, list(c.hosts), vm)
        case.violations += state_problems(seen, vm, where, replay(graph(vm), c.sent[vm]))
        got = seen[where]["managed_object"]["planes"].get(vm, {}).get("elements", {}).get(vm, {})
        if last[0] and got.get("attributes", {}).get("generation") != last[0]:
            case.violations.append(f"{where}: VM element at generation {got.get('attributes', {}).get('generation')}, "
                                   f"the source's last change was {last[0]}")
        expect = "rolled_back" if step == "compensate" else None
        if expect and out.status != expect:
            case.violations.append(f"expected {expect}, got {out.status}")
        if out.status not in ("completed", "rolled_back"):
            case.violations.append(f"ended {out.status}: {out.reason}")
    except Exception as exc:
        case.violations.append(f"{type(exc).__name__}: {exc}")
    finally:
        stop.set()
        for f in feeders:
            f.cancel()
            with contextlib.suppress(BaseException):
                await f
        RESULTS.add(case)
    assert not case.violations, case


async def test_every_event_and_dispatch_duplicated(faulty: tuple[Cluster, FaultyBus]) -> None:
    """Every event and every sensor-to-plane dispatch arrives twice, all through a migration."""
    c, bus = faulty
    bus.arm(Rule("duplicate", pattern="vm.*.event", times=None, label="duplicate events"))
    bus.arm(Rule("duplicate", types=("DispatchEvents",), times=None, label="duplicate events"))
    await c.create_vm("host-a", "vm1", memory_mib=256, sim_bandwidth_mibps=512)
    await c.send_events("vm1", 20)
    stop = asyncio.Event()
    feeder = asyncio.create_task(_events(c, "vm1", stop))
    out = await c.migrate("vm1", "host-b", timeout=60)
    stop.set()
    await feeder
    await c.send_events("vm1", 10)
    bad = await inspect_problems(c, "vm1", "host-b")
    seen = await inspect_all(c.client, list(c.hosts), "vm1")
    bad += state_problems(seen, "vm1", "host-b", replay(graph("vm1"), c.sent["vm1"]))
    RESULTS.add(Case("duplicate every event+dispatch (in-process)", "-", out.status, bad))
    assert out.status == "completed" and not bad


@pytest.mark.parametrize("outcome", ["completed", "rolled_back"])
async def test_every_bind_and_unbind_fails_once(faulty: tuple[Cluster, FaultyBus], outcome: str) -> None:
    """The first bind and unbind of every routing key fail (the connection went while the
    broker was asked): the redelivered step must still bind, or the source alone would take
    the VM's events from then on and drop them at teardown."""
    c, bus = faulty
    fail = {"sim_fail": "finish"} if outcome == "rolled_back" else {}  # after the binds
    await c.create_vm("host-a", "vm1", memory_mib=256, sim_bandwidth_mibps=512, **fail)
    await c.send_events("vm1", 10)
    bus.flaky_bindings = True
    stop = asyncio.Event()
    feeder = asyncio.create_task(_events(c, "vm1", stop))
    try:
        out = await c.migrate("vm1", "host-b", timeout=60)
    finally:
        stop.set()
        await feeder
    await c.send_events("vm1", 10)
    where = "host-b" if outcome == "completed" else "host-a"
    bad = await inspect_problems(c, "vm1", where)
    seen = await inspect_all(c.client, list(c.hosts), "vm1")
    bad += state_problems(seen, "vm1", where, replay(graph("vm1"), c.sent["vm1"]))
    if out.status != outcome:
        bad.append(f"expected {outcome}, got {out.status}: {out.reason}")
    if not bus.injected.get("bind failed"):
        bad.append("no bind failed: the fault was not injected")
    RESULTS.add(Case("every bind/unbind fails once (in-process)", "event_state", out.status, bad))
    assert not bad


async def test_policy_effects_survive_a_failed_publish(faulty: tuple[Cluster, FaultyBus]) -> None:
    """An alarm whose publish fails (connection lost) is sent when the dispatch comes again,
    once: the events it came from were already applied and are not applied a second time."""
    c, bus = faulty
    alarms: asyncio.Queue[Any] = asyncio.Queue()

    async def on_alarm(d: Any) -> None:
        await d.ack()
        alarms.put_nowait(orjson.loads(d.message.body))

    await bus.inner.consume(QueueSpec("test.alarms", ("alarm.#",)), on_alarm)
    await c.create_vm("host-a", "vm1", memory_mib=256)
    rule = bus.arm(Rule("fail", pattern="alarm.*", times=3, label="alarm publish fails"))
    await c.send_events("vm1", 4)  # the fourth (n=3) is a disk error: one disk-error alarm
    await c.settle("vm1")
    got = [await asyncio.wait_for(alarms.get(), 10)]
    await asyncio.sleep(0.3)
    while not alarms.empty():
        got.append(alarms.get_nowait())
    assert rule.hits == 3
    assert [a["name"] for a in got] == ["disk-error"], got
    plane = c.host("host-a").managed_object.planes["vm1"]
    errors = [s["errors"] for s in plane.state.values() if "errors" in s]
    assert errors == [1], errors  # the redelivered dispatch did not count the error again
    assert not c.host("host-a").managed_object.outbox.get("vm1")


@pytest.mark.parametrize("migrate", [False, True])
async def test_failed_dispatches_keep_time_order(faulty: tuple[Cluster, FaultyBus], migrate: bool) -> None:
    """Dispatches from the sensor fail now and then (the connection went): the events are
    held and dispatched later, still exactly once and in time order, also when newer events
    arrive meanwhile and when the VM migrates."""
    c, bus = faulty
    await c.create_vm("host-a", "vm1", memory_mib=256, sim_bandwidth_mibps=512)
    rule = bus.arm(Rule("fail", types=("DispatchEvents",), times=None, delay_s=0.03, label="dispatch fails"))
    stop = asyncio.Event()

    async def flaky() -> None:  # fail for a while, work for a while, again and again
        while not stop.is_set():
            rule.times = rule.hits + 2
            await asyncio.sleep(0.05)
            rule.times = rule.hits
            await asyncio.sleep(0.1)

    toggler = asyncio.create_task(flaky())
    feeder = asyncio.create_task(_events(c, "vm1", stop))
    try:
        await c.send_events("vm1", 30)
        if migrate:
            out = await c.migrate("vm1", "host-b", timeout=60)
            assert out.status == "completed", out.reason
        else:
            await asyncio.sleep(1.0)
    finally:
        stop.set()
        await asyncio.gather(toggler, feeder)
    rule.times = rule.hits
    await c.send_events("vm1", 5)
    where = "host-b" if migrate else "host-a"
    await c.settle("vm1")
    bad = await inspect_problems(c, "vm1", where)
    if migrate:  # the table counts migrations; without one there is no outcome to report
        RESULTS.add(Case("sensor dispatch fails now and then (in-process)", "-", "completed", bad))
    assert rule.hits > 0
    assert not bad


async def test_source_lost_after_completion_goes_forward(faulty: tuple[Cluster, FaultyBus]) -> None:
    """The hypervisor completed, the switch-over times out (its requests are lost), and the
    source guest's process died meanwhile: a rollback would destroy the only copy left, so the
    saga goes forward and completes on the target instead."""
    c, bus = faulty
    await c.create_vm("host-a", "vm1", memory_mib=256, sim_bandwidth_mibps=512, sim_source_crash=True)
    await c.send_events("vm1", 10)
    rule = bus.arm(Rule("drop", types=("FinishIncoming",), times=TIMEOUTS.attempts, label="drop FinishIncoming"))
    out = await c.migrate("vm1", "host-b", timeout=60)
    await c.send_events("vm1", 5)
    bad = await inspect_problems(c, "vm1", "host-b")
    rec = await c.store.get(out.migration_id)
    assert rec is not None
    RESULTS.add(Case("source guest died after completion (in-process)", "switch_over", out.status, bad))
    assert rule.hits == TIMEOUTS.attempts
    assert out.status == "completed", out.reason
    assert [h.event for h in rec.history if h.step == "compensate"] == ["started", "forward"]
    assert not bad


async def test_a_lost_outcome_event_is_read_from_the_record(faulty: tuple[Cluster, FaultyBus]) -> None:
    """The `migration.completed` event is lost (published while the broker was down, or just
    before the coordinator died): whoever follows the migration learns the outcome from the
    saga record instead of waiting out its timeout."""
    c, bus = faulty
    await c.create_vm("host-a", "vm1", memory_mib=256, sim_bandwidth_mibps=512)
    rule = bus.arm(Rule("drop", pattern="migration.completed", times=None, label="drop outcome event"))
    mid = await c.client.migrate("vm1", "host-b")
    out = await c.client.outcome(mid, timeout=30)
    assert rule.hits == 1
    assert out.status == "completed" and out.detail == {"from": "record"}


async def test_status_of_steps_listed() -> None:
    assert set(STEPS) <= set(STEP_TYPES)
