"""A Ferry cluster for tests: coordinator and hosts on one bus, and the invariant checks."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ferry_cli.client import STATUSES, FerryClient
from ferry_cli.cluster import Host, HostOptions, build_coordinator, build_host
from ferry_common.bus.amqp import AmqpBus
from ferry_common.bus.interfaces import Bus
from ferry_common.bus.memory import MemoryBus
from ferry_common.clock import Clock, SystemClock
from ferry_common.endpoint import Endpoint
from ferry_common.messages.domain import Event, ManagementGraph, Module
from ferry_common.messages.public import VmEvent
from ferry_common.settings import Settings, load_settings
from ferry_common.tracing import BusSpanExporter, installed, setup_tracing
from ferry_coordinator.service import CoordinatorService
from ferry_coordinator.store import MemorySagaStore, SagaStore
from ferry_coordinator.timeouts import SagaTimeouts

from .sample import MODULES, graph, vm_spec

# the test process's settings, read once (tracing and the collector's thresholds as a service has them)
SETTINGS: Settings = load_settings()
AMQP_BASE = os.environ.get("FERRY_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
AMQP_PORT = urlsplit(AMQP_BASE).port or 5672
FAST = SagaTimeouts(reply_s=1.0, attempts=2, status_poll_s=0.5, forward_retry_s=0.05, forward_retry_max_s=0.5, lease_s=5.0)


def rabbitmqctl(*args: str) -> list[str]:
    """``rabbitmqctl -q ARGS`` for the test broker: the machine's, or the node of one's own that
    ``RABBITMQ_NODENAME`` names (with ``FERRY_TEST_AMQP`` at its port and its cookie under
    ``$HOME``), called without Debian's wrapper, which switches to the rabbitmq user's HOME."""
    node = os.environ.get("RABBITMQ_NODENAME")
    if not node:
        return ["rabbitmqctl", "-q", *args]
    direct = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")
    return [str(direct) if direct.exists() else "rabbitmqctl", "-q", "-n", node, *args]


def make_vhost() -> str:
    """A private RabbitMQ vhost, so runs and leftovers of earlier runs never meet."""
    name = f"ferry-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(rabbitmqctl("add_vhost", name), check=True, capture_output=True)
    subprocess.run(rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*"), check=True, capture_output=True)
    return name


def drop_vhost(name: str) -> None:
    subprocess.run(rabbitmqctl("delete_vhost", name), check=False, capture_output=True)


def amqp_url(vhost: str) -> str:
    return AMQP_BASE.rstrip("/") + "/" + vhost


async def new_bus(kind: str, vhost: str | None = None, shared: MemoryBus | None = None, *,
                  url: str | None = None) -> Bus:
    if kind == "memory":
        return shared or MemoryBus()
    assert vhost is not None or url is not None
    bus = AmqpBus(url or amqp_url(vhost or ""), name=f"test-{uuid.uuid4().hex[:6]}")
    await bus.connect()
    return bus


@dataclass
class Cluster:
    kind: str
    buses: list[Bus]
    coordinator: CoordinatorService
    hosts: dict[str, Host]
    client: FerryClient
    store: SagaStore
    clock: Clock
    sent: dict[str, list[Event]] = field(default_factory=dict)
    vhost: str | None = None
    _ts: float = 0.0

    def host(self, name: str) -> Host:
        return self.hosts[name]

    async def create_vm(self, host: str, vm_id: str, *, memory_mib: int = 1024, modules: list[Module] | None = None,
                        g: ManagementGraph | None = None, **params: Any) -> None:
        spec = vm_spec(vm_id, memory_mib=memory_mib, **params)
        await self.client.create_vm(host, spec, g or graph(vm_id), MODULES if modules is None else modules)
        await self.wait_placement(vm_id, host)

    async def wait_placement(self, vm_id: str, host: str, timeout: float = 10.0) -> None:
        async def placed() -> bool:
            loc = self.coordinator.hosts.locate(vm_id)
            return loc is not None and loc[0] == host
        await until(placed, timeout, f"coordinator to see {vm_id} on {host}")

    async def send_events(self, vm_id: str, n: int, **kw: Any) -> list[Event]:
        from .sample import event
        out = []
        start = len(self.sent.get(vm_id, []))
        for i in range(start, start + n):
            self._ts += 1.0
            ev = event(vm_id, i, 1_000_000.0 + self._ts, **kw)
            await self.client.send_event(VmEvent.model_validate(ev.model_dump()))
            out.append(ev)
        self.sent.setdefault(vm_id, []).extend(out)
        return out

    async def send_batches(self, vm_id: str, n: int, size: int, **kw: Any) -> list[Event]:
        """Like :meth:`send_events`, as ``VmEventBatch`` messages of ``size`` events."""
        from .sample import event
        out = []
        start = len(self.sent.get(vm_id, []))
        for i in range(start, start + n):
            self._ts += 1.0
            out.append(event(vm_id, i, 1_000_000.0 + self._ts, **kw))
        for i in range(0, n, size):
            await self.client.send_batch(vm_id, out[i : i + size])
        self.sent.setdefault(vm_id, []).extend(out)
        return out

    async def migrate(self, vm_id: str, target: str, *, timeout: float = 60.0, **kw: Any) -> Any:
        mid = await self.client.migrate(vm_id, target, **kw)
        return await self.client.outcome(mid, timeout=timeout)

    async def settle(self, vm_id: str, timeout: float = 10.0) -> None:
        """Wait until every sent event has been dispatched somewhere (or time runs out)."""
        want = {e.id for e in self.sent.get(vm_id, [])}

        async def done() -> bool:
            got: set[str] = set()
            for h in self.hosts.values():
                got.update(h.managed_object.ledger.get(vm_id, []))
            return want <= got
        await until(done, timeout, f"all events of {vm_id} to be dispatched", raise_=False)

    async def close(self) -> None:
        tracing = installed()
        if tracing is not None and tracing.bus_exporter is not None:
            await tracing.bus_exporter.detach(self.coordinator.endpoint)
        await self.client.close()
        await self.coordinator.stop()
        await self.coordinator.endpoint.close()
        for h in self.hosts.values():
            await h.stop()
        seen: set[int] = set()
        for b in self.buses:
            if id(b) not in seen:
                seen.add(id(b))
                await b.close()
        if self.vhost:
            drop_vhost(self.vhost)


def metric_sample(text: str, name: str, labels: str = "") -> float:
    """One sample of a Prometheus text rendering (``metrics.REGISTRY.render()``); 0 if absent."""
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def until(check: Any, timeout: float, what: str, *, raise_: bool = True) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.01)
    if raise_:
        raise AssertionError(f"timed out waiting for {what}")
    return False


async def make_cluster(
    kind: str,
    hosts: tuple[str, ...] = ("host-a", "host-b", "host-c"),
    *,
    timeouts: SagaTimeouts = FAST,
    options: dict[str, HostOptions] | None = None,
    store: SagaStore | None = None,
    clock: Clock | None = None,
    auth: Any = None,
    client_identity: str = "client/test",
    watch: Sequence[str] = STATUSES,
    broker_urls: Sequence[str] | None = None,
) -> Cluster:
    """A coordinator and ``hosts`` on a fresh broker, and a client watching the statuses
    ``watch`` (every one by default). ``broker_urls`` (rabbitmq only): the nodes of a broker
    cluster of the test's own, used as they are; each bus gets them all, starting at the next."""
    clock = clock or SystemClock()
    vhost = make_vhost() if kind == "rabbitmq" and not broker_urls else None
    shared = MemoryBus() if kind == "memory" else None
    buses: list[Bus] = []

    async def bus() -> Bus:
        url = None
        if broker_urls:
            i = len(buses) % len(broker_urls)
            url = ",".join([*broker_urls[i:], *broker_urls[:i]])
        b = await new_bus(kind, vhost, shared, url=url)
        buses.append(b)
        return b

    store = store or MemorySagaStore()
    # one provider per test session; each cluster ships spans through its own coordinator
    tracing = setup_tracing("ferry-tests", bus_exporter=BusSpanExporter(), env=SETTINGS.tracing_env())
    extra = {"auth": auth} if auth is not None else {}
    coordinator = build_coordinator(await bus(), store, clock=clock, timeouts=timeouts, **extra)
    await coordinator.start()
    if tracing.bus_exporter is not None:
        tracing.bus_exporter.attach(coordinator.endpoint)
    built: dict[str, Host] = {}
    for name in hosts:
        opts = (options or {}).get(name, HostOptions(inventory_interval_s=0.5))
        h = build_host(name, await bus(), clock=clock, options=opts, **extra)
        await h.start()
        built[name] = h
    client_auth = auth(client_identity) if auth is not None else None
    client = FerryClient(Endpoint(await bus(), client_identity, clock=clock, auth=client_auth), timeout=5.0)
    await client.watch(watch)
    cluster = Cluster(kind, buses, coordinator, built, client, store, clock, vhost=vhost)

    async def known() -> bool:
        return all(coordinator.hosts.known(h) for h in hosts)
    await until(known, 10.0, "hosts to report their inventory")
    return cluster


async def check_invariants(c: Cluster, vm_id: str, where: str) -> dict[str, Any]:
    """Exactly one active plane, where the VM runs; nothing staged; every event once, in order."""
    problems: list[str] = []
    active = []
    for name, h in c.hosts.items():
        plane = h.managed_object.planes.get(vm_id)
        vm_state = await h.adapter.driver.state(vm_id)
        if plane is not None and plane.status == "active":
            active.append(name)
        elif plane is not None:
            problems.append(f"{name}: plane left {plane.status}")
        sensor_vm = h.sensor.vms.get(vm_id)
        if sensor_vm is not None and (sensor_vm.mode != "active" or sensor_vm.queued):
            problems.append(f"{name}: sensor {sensor_vm.mode} with {sensor_vm.queued} queued")
        if name != where and sensor_vm is not None:
            problems.append(f"{name}: sensor still takes events of {vm_id}")
        if any(r.vm_id == vm_id for r in h.migration_policy.reservations.values()):
            problems.append(f"{name}: reservation left")
        if name == where and vm_state != "running":
            problems.append(f"{name}: VM is {vm_state}, not running")
        if name != where and vm_state not in ("absent",):
            problems.append(f"{name}: VM is {vm_state} here too")
    if active != [where]:
        problems.append(f"active planes on {active}, expected only on {where}")
    await c.settle(vm_id)
    sent = c.sent.get(vm_id, [])
    dispatched: list[str] = []
    for h in c.hosts.values():
        dispatched.extend(h.managed_object.ledger.get(vm_id, []))
    sent_ids = [e.id for e in sent]
    if sorted(dispatched) != sorted(sent_ids):
        lost = set(sent_ids) - set(dispatched)
        dup = len(dispatched) - len(set(dispatched))
        problems.append(f"events: {len(lost)} lost, {dup} duplicated, {len(set(dispatched) - set(sent_ids))} unknown")
    ts = {e.id: e.ts for e in sent}
    order = [ts[i] for i in dispatched if i in ts]
    # the ledger is per host; across hosts the source's part precedes the target's
    per_host_ok = all(
        [ts[i] for i in h.managed_object.ledger.get(vm_id, []) if i in ts]
        == sorted(ts[i] for i in h.managed_object.ledger.get(vm_id, []) if i in ts)
        for h in c.hosts.values()
    )
    if not per_host_ok:
        problems.append("events dispatched out of time order")
    assert not problems, "; ".join(problems)
    return {"active": where, "dispatched": len(order)}


def inject_answer(host: Host, service: str, message_type: str, answer: Any) -> None:
    """Make ``service`` on ``host`` answer ``message_type`` with ``answer`` (a failure answer)."""
    svc = host.services[service]
    model, _ = svc.router.handlers[message_type]

    async def fail(msg: Any, ctx: Any) -> Any:
        return answer

    svc.router.handlers[message_type] = (model, fail)


async def inspect_problems(c: Cluster, vm_id: str, where: str) -> list[str]:
    from .verify import inspect_all, problems

    await c.settle(vm_id)

    async def nothing_held() -> bool:
        # a sensor may still hold events that went out once already (a drain cut short, e.g. by
        # a restart, before its answer came): they go again once its lease is renewed, and the
        # managed object drops them as seen; what never goes is reported below
        return not any((v := h.sensor.vms.get(vm_id)) is not None and v.queued for h in c.hosts.values())
    await until(nothing_held, 10.0, f"sensors to send what they hold of {vm_id}", raise_=False)
    seen = await inspect_all(c.client, list(c.hosts), vm_id)
    return problems(seen, vm_id, where, c.sent.get(vm_id, []))
