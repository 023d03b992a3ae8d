"""Crashes in mid-saga: the coordinator dies at every step (after the step's effect, before
it recorded it) and a new one resumes from the store; every host service restarts from its
state store at every step. Each migration still ends completed or rolled back, with every
invariant intact and no step's effect applied twice."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from ferry_cli.cluster import HOST_SERVICES, build_coordinator, build_service
from ferry_common.state import SqliteStateStore, StateStore
from ferry_common.tracing import installed
from ferry_coordinator.saga import STEPS
from ferry_coordinator.saga.run import SagaRun
from ferry_coordinator.store.sqlite import SqliteSagaStore
from ferry_coordinator.timeouts import SagaTimeouts
from tests.harness import Cluster, inspect_problems, make_cluster, new_bus

TIMEOUTS = SagaTimeouts(reply_s=1.0, attempts=2, status_poll_s=0.3, forward_retry_s=0.05,
                        forward_retry_max_s=0.3, lease_s=1.0)


class Crash(BaseException):
    """Stands for kill -9: nothing after it runs, nothing is cleaned up."""


@pytest.fixture
async def durable(tmp_path: Path, bus_kind: str):
    store = await SqliteSagaStore.open(f"sqlite:///{tmp_path / 'sagas.db'}")
    c = await make_cluster(bus_kind, ("host-a", "host-b"), timeouts=TIMEOUTS, store=store)
    # every host service keeps its state in its own SQLite file, as `ferry up` does
    states: dict[tuple[str, str], StateStore] = {}
    for host in c.hosts:
        for name in HOST_SERVICES:
            states[(host, name)] = await SqliteStateStore.open(str(tmp_path / f"{host}-{name}.db"))
        await restart_host(c, host, states)
    c.states = states  # type: ignore[attr-defined]
    yield c
    await c.close()
    for s in states.values():
        await s.close()
    await store.close()


async def restart_host(c: Cluster, host: str, states: dict[tuple[str, str], StateStore]) -> None:
    """Replace every service of ``host`` by a fresh instance on the same state store."""
    h = c.hosts[host]
    for name in HOST_SERVICES:
        old = h.services[name]
        await old.stop()
        driver = getattr(old, "driver", None)
        new = build_service(name, host, old.endpoint.bus, options=None, driver=driver, state=states[(host, name)],
                            clock=c.clock)
        if name == "hypervisor_adapter":
            new.inventory_interval_s = 0.5  # type: ignore[attr-defined]
        await new.start()
        h.services[name] = new


async def crash_coordinator(c: Cluster) -> None:
    """The coordinator dies and a new one starts on the same store. On RabbitMQ its
    connection dies with it, as a process's does: the new one connects afresh."""
    old = c.coordinator
    tasks = list(old.running.values())
    for task in tasks:
        task.cancel()
    for task in tasks:  # a saga may have died of the crash already (raised in work beside a step)
        with contextlib.suppress(asyncio.CancelledError, Crash):
            await task
    await old.stop()
    await old.endpoint.close()
    tracing = installed()
    if tracing is not None and tracing.bus_exporter is not None:
        await tracing.bus_exporter.detach(old.endpoint)
    bus = old.endpoint.bus
    if c.kind == "rabbitmq":
        c.buses.remove(bus)
        await bus.close()
        bus = await new_bus(c.kind, c.vhost)
        c.buses.append(bus)
    c.coordinator = build_coordinator(bus, c.store, clock=c.clock, timeouts=TIMEOUTS)
    await c.coordinator.start()
    if tracing is not None and tracing.bus_exporter is not None:
        tracing.bus_exporter.attach(c.coordinator.endpoint)


# requests the saga sends beside another step belong to the step they serve: the VM's
# migration is launched beside step 3, the guest confirmed on the target beside steps 2
# and 4, and the source torn down beside step 7
BESIDE = {"PrepareIncoming": "migrate_vm", "PerformMigration": "migrate_vm", "FinishIncoming": "switch_over",
          "SourceTeardown": "teardown"}


def step_of(saga: SagaRun, msg: Any) -> str:
    if saga.rec.status == "compensating":
        return "compensate"
    return BESIDE.get(type(msg).__name__, saga.rec.step)


def crash_after(step: str, monkeypatch: pytest.MonkeyPatch, fired: asyncio.Event) -> None:
    """The first request of ``step`` gets its answer, then the coordinator dies."""
    real = SagaRun.call

    async def call(self: SagaRun, host: str, msg: Any, **kw: Any) -> Any:
        answer = await real(self, host, msg, **kw)
        if step_of(self, msg) == step and not fired.is_set():
            fired.set()
            raise Crash(f"crash in {step}")
        return answer

    monkeypatch.setattr(SagaRun, "call", call)


@pytest.mark.parametrize("step", STEPS)
async def test_coordinator_crash_at_every_step_then_resume(durable: Cluster, step: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    c = durable
    await c.create_vm("host-a", "vm1", memory_mib=256)
    await c.send_events("vm1", 10)
    fired = asyncio.Event()
    crash_after(step, monkeypatch, fired)
    mid = await c.client.migrate("vm1", "host-b")
    await asyncio.wait_for(fired.wait(), 20)
    await c.send_events("vm1", 5)
    await crash_coordinator(c)
    outcome = await c.client.outcome(mid, timeout=30)
    assert outcome.status == "completed", outcome
    rec = await c.store.get(mid)
    assert rec is not None and rec.owner == c.coordinator.owner
    await c.send_events("vm1", 5)
    assert await inspect_problems(c, "vm1", "host-b") == []


async def test_coordinator_crash_during_compensation_still_rolls_back(durable: Cluster,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    c = durable
    await c.create_vm("host-a", "vm1", memory_mib=256, sim_fail="migrate")
    await c.send_events("vm1", 10)
    fired = asyncio.Event()
    crash_after("compensate", monkeypatch, fired)
    mid = await c.client.migrate("vm1", "host-b")
    await asyncio.wait_for(fired.wait(), 20)
    await crash_coordinator(c)
    outcome = await c.client.outcome(mid, timeout=30)
    assert (outcome.status, outcome.code) == ("rolled_back", "vm_migration_failed")
    assert await inspect_problems(c, "vm1", "host-a") == []


@pytest.mark.parametrize("step", [s for s in STEPS if s != "admission"])
async def test_every_host_service_restarts_at_every_step(durable: Cluster, step: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Both hosts lose their processes between two steps and come back from their state."""
    c = durable
    await c.create_vm("host-a", "vm1", memory_mib=256)
    await c.send_events("vm1", 10)
    await c.settle("vm1")
    gate, reached = asyncio.Event(), asyncio.Event()
    real = SagaRun.call

    async def call(self: SagaRun, host: str, msg: Any, **kw: Any) -> Any:
        if step in (self.rec.step, step_of(self, msg)):
            reached.set()
        if reached.is_set():  # everything from then on waits, also what runs beside the step
            await gate.wait()
        return await real(self, host, msg, **kw)

    monkeypatch.setattr(SagaRun, "call", call)
    mid = await c.client.migrate("vm1", "host-b")
    await asyncio.wait_for(reached.wait(), 20)
    await c.send_events("vm1", 5)
    await asyncio.sleep(0.1)
    for host in c.hosts:
        await restart_host(c, host, c.states)  # type: ignore[attr-defined]
    gate.set()
    outcome = await c.client.outcome(mid, timeout=30)
    assert outcome.status == "completed", outcome
    await c.send_events("vm1", 5)
    assert await inspect_problems(c, "vm1", "host-b") == []
    state = c.host("host-b").managed_object.planes["vm1"].state["vm1.load"]
    # each event acted once, across the restarts
    assert state["seen"] == sum(1 for e in c.sent["vm1"] if e.element_id == "vm1")


async def test_a_restarted_service_answers_a_replayed_step_the_same(durable: Cluster) -> None:
    from ferry_common.bus.topology import host_command
    from ferry_common.messages.commands import StartMigration
    from ferry_testing.sample import vm_spec

    c = durable
    msg = StartMigration(migration_id="m-replay", vm_id="vm9", source_host="host-a", target_host="host-b",
                         vm=vm_spec("vm9", memory_mib=128))
    key = host_command("host-b", "migration_policy")
    first = await c.client.endpoint.request(key, msg, timeout=5)
    await restart_host(c, "host-b", c.states)  # type: ignore[attr-defined]
    again = await c.client.endpoint.request(key, msg, timeout=5)
    assert first == again
    assert list(c.host("host-b").migration_policy.reservations) == ["m-replay"]
    with contextlib.suppress(Exception):
        pass
