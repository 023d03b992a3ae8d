"""Shared plumbing of the control-plane benchmarks: clusters, vhosts, statistics, output.

Every benchmark builds the coordinator and the hosts in *one* process (like
``tests/harness.py``), each service with its own :class:`~ferry_common.endpoint.Endpoint`
and each host (and the coordinator, and the benchmark's client) on its own bus
connection. With RabbitMQ they live in a private vhost that is deleted afterwards.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry_cli.client import FerryClient
from ferry_cli.cluster import Host, HostOptions, build_coordinator, build_host
from ferry_common.bus.amqp import AmqpBus
from ferry_common.bus.interfaces import Bus, Consumer, DeliveryHandler, Message, QueueSpec
from ferry_common.bus.memory import MemoryBus
from ferry_common.endpoint import Context, Endpoint, Router
from ferry_common.messages.commands import Health, HealthCheck
from ferry_common.runtime import tune_gc
from ferry_common.settings import load_settings
from ferry_coordinator.service import CoordinatorService
from ferry_coordinator.store import MemorySagaStore
from ferry_coordinator.timeouts import SagaTimeouts

AMQP_BASE = os.environ.get("FERRY_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
RESULTS = Path(__file__).resolve().parent / "results"
# generous: a benchmark measures, it must not turn load into timeouts and rollbacks
BENCH_TIMEOUTS = SagaTimeouts(reply_s=60.0, attempts=2, status_poll_s=5.0, lease_s=120.0)
ONE_PROCESS = "coordinator and hosts run in this one process (one event loop), each on its own bus connection"
HOST_PROCESS = ("coordinator in this process; the hosts' services in a second process (`ferry up --no-coordinator`, "
                "state in memory, as here), as a deployment runs them apart")


# ---- statistics ---------------------------------------------------------------------
def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def pct(xs: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return float(s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))])


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


# ---- output -------------------------------------------------------------------------
def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain fixed-width table."""
    cells = [[_fmt(c) for c in header], *[[_fmt(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:  # NaN
            return "-"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        out = subprocess.run(["rabbitmqctl", "-q", "version"], capture_output=True, text=True, timeout=30)
        info["rabbitmq"] = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["rabbitmq"] = None
    return info


def write_results(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **payload}, indent=2, default=str) + "\n")
    return path


# ---- the messaging floor: one request/reply as a saga step makes it ---------------------
@asynccontextmanager
async def echo_pair(server_bus: Bus, client_bus: Bus) -> AsyncIterator[Callable[[float], Awaitable[None]]]:
    """An echo service and a client on two buses, each an :class:`Endpoint` as every saga
    step uses (durable queue, confirms, mandatory routing, tracing, signing); yields
    ``call(timeout)``, one request/reply."""
    server = Endpoint(server_bus, "bench/echo")
    client = Endpoint(client_bus, "bench/echo-client")
    router = Router()

    async def echo(msg: HealthCheck, ctx: Context) -> Health:
        return Health(service="echo")

    async def call(timeout: float) -> None:
        await client.request("bench.echo", HealthCheck(), timeout=timeout)

    router.add(HealthCheck, echo)
    await server.serve(QueueSpec("ferry.bench.echo", ("bench.echo",), durable=True, prefetch=256), router)
    try:
        yield call
    finally:
        await client.close()
        await server.close()


async def round_trips_ms(call: Callable[[float], Awaitable[None]], samples: int, *, warmup: int) -> list[float]:
    """``samples`` timed calls one after another, after ``warmup`` untimed ones (the reply
    queue, the channels and the code paths warm)."""
    for _ in range(warmup):
        await call(30)
    rtts = []
    for _ in range(samples):
        t = time.perf_counter()
        await call(30)
        rtts.append((time.perf_counter() - t) * 1000)
    return rtts


# ---- RabbitMQ vhosts ------------------------------------------------------------------
def make_vhost(prefix: str = "ferry-bench") -> str:
    """A private vhost, so a run never meets leftovers of another."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", name], check=True, capture_output=True)
    subprocess.run(
        ["rabbitmqctl", "-q", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"], check=True, capture_output=True
    )
    return name


def drop_vhost(name: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", "delete_vhost", name], check=False, capture_output=True)


def drop_queue(vhost: str | None, name: str) -> None:
    """Delete a benchmark's own queue once it is done with it (no-op on the memory bus): an
    idle quorum queue left behind still costs the broker, and the next measurement."""
    if vhost is not None:
        subprocess.run(["rabbitmqctl", "-q", "delete_queue", "-p", vhost, name], check=False, capture_output=True)


def amqp_url(vhost: str) -> str:
    return AMQP_BASE.rstrip("/") + "/" + vhost


# ---- a bus that counts what is published ------------------------------------------------
class CountingBus:
    """Wraps a bus and counts published messages by type (routing key for untyped ones)."""

    def __init__(self, inner: Bus) -> None:
        self.inner = inner
        self.published = 0
        self.by_type: dict[str, int] = {}
        self._amqp_base = 0

    def reset(self) -> None:
        self.published = 0
        self.by_type = {}
        self._amqp_base = int(getattr(self.inner, "amqp_published", 0))

    @property
    def amqp_published(self) -> int:
        """AMQP messages since the last reset, a batch of coalesced messages counting once
        (the in-process bus: as many as published)."""
        if not hasattr(self.inner, "amqp_published"):
            return self.published
        return int(self.inner.amqp_published) - self._amqp_base

    async def connect(self) -> None:
        await self.inner.connect()

    async def close(self) -> None:
        await self.inner.close()

    async def publish(self, message: Message, *, mandatory: bool = True) -> None:
        self.published += 1
        key = message.type or message.routing_key
        self.by_type[key] = self.by_type.get(key, 0) + 1
        await self.inner.publish(message, mandatory=mandatory)

    async def dead_letter(self, message: Message, reason: str, code: str) -> None:
        await self.inner.dead_letter(message, reason, code)

    async def consume(self, spec: QueueSpec, handler: DeliveryHandler) -> Consumer:
        return await self.inner.consume(spec, handler)

    async def bind(self, queue: str, routing_key: str) -> None:
        await self.inner.bind(queue, routing_key)

    async def unbind(self, queue: str, routing_key: str) -> None:
        await self.inner.unbind(queue, routing_key)

    async def purge(self, queue: str) -> int:
        return await self.inner.purge(queue)


# ---- a cluster in this process ------------------------------------------------------------
@dataclass
class BenchCluster:
    """Coordinator, hosts and a client, all in this process, on one broker."""

    kind: str
    coordinator: CoordinatorService
    hosts: dict[str, Host]
    client: FerryClient
    buses: list[CountingBus]
    vhost: str | None = None
    extra: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def published(self) -> int:
        return sum(b.published for b in self.buses)

    @property
    def amqp_published(self) -> int:
        return sum(b.amqp_published for b in self.buses)

    def by_type(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for b in self.buses:
            for k, v in b.by_type.items():
                out[k] = out.get(k, 0) + v
        return out

    def reset_counts(self) -> None:
        for b in self.buses:
            b.reset()

    async def new_bus(self) -> CountingBus:
        """Another connection to the same broker (the shared in-memory broker, or the vhost)."""
        bus = await _connect(self.kind, self.vhost, self._shared())
        self.buses.append(bus)
        return bus

    def _shared(self) -> MemoryBus | None:
        inner = self.buses[0].inner
        return inner if isinstance(inner, MemoryBus) else None

    async def close(self) -> None:
        for fn in self.extra:
            await fn()
        await self.client.close()
        await self.coordinator.stop()
        await self.coordinator.endpoint.close()
        for h in self.hosts.values():
            await h.stop()
        for p in self.procs:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        seen: set[int] = set()
        for b in self.buses:
            if id(b.inner) not in seen:
                seen.add(id(b.inner))
                await b.inner.close()
        if self.vhost:
            drop_vhost(self.vhost)


async def _connect(kind: str, vhost: str | None, shared: MemoryBus | None) -> CountingBus:
    if kind == "memory":
        return CountingBus(shared or MemoryBus())
    assert vhost is not None
    bus = AmqpBus(amqp_url(vhost), name=f"bench-{uuid.uuid4().hex[:6]}")
    await bus.connect()
    return CountingBus(bus)


async def start_cluster(
    kind: str,
    hosts: Sequence[str],
    *,
    timeouts: SagaTimeouts = BENCH_TIMEOUTS,
    inventory_interval_s: float = 30.0,
    host_process: bool = False,
) -> BenchCluster:
    """Start a coordinator and ``hosts`` on a fresh broker (``memory`` or ``rabbitmq``);
    ``host_process``: the hosts run in a second process (RabbitMQ only), not in this one."""
    tune_gc(load_settings())  # what every service process does at start (``ferry up``, ``ferry service``)
    vhost = make_vhost() if kind == "rabbitmq" else None
    shared = MemoryBus() if kind == "memory" else None
    buses: list[CountingBus] = []

    async def bus() -> CountingBus:
        b = await _connect(kind, vhost, shared)
        buses.append(b)
        return b

    try:
        coordinator = build_coordinator(await bus(), MemorySagaStore(), timeouts=timeouts)  # type: ignore[arg-type]
        await coordinator.start()
        built: dict[str, Host] = {}
        procs = [_host_process(vhost, hosts)] if host_process and vhost else []
        for name in hosts if not procs else ():
            h = build_host(name, await bus(), options=HostOptions(inventory_interval_s=inventory_interval_s))  # type: ignore[arg-type]
            await h.start()
            built[name] = h
        # requests only: it does not watch every status (`client.watch()`), because a client
        # that follows migrations runs elsewhere, and here it took the coordinator's process
        # (a fifth of the wave's rate with the hosts apart); the waves follow the outcomes alone
        client = FerryClient(Endpoint(await bus(), "client/bench"), timeout=60.0)  # type: ignore[arg-type]
    except BaseException:
        if vhost:
            drop_vhost(vhost)
        raise
    cluster = BenchCluster(kind, coordinator, built, client, buses, vhost=vhost, procs=procs)
    await wait_for(lambda: all(coordinator.hosts.known(h) for h in hosts), 30.0, "hosts to report their inventory")
    return cluster


def _host_process(vhost: str, hosts: Sequence[str]) -> subprocess.Popen[bytes]:
    """``ferry up`` for ``hosts`` without a coordinator, configured as the in-process hosts are:
    state in memory, no span shipping, inventory every second (VMs are found by it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AMQP_URL": amqp_url(vhost), "FERRY_STATE_DIR": "", "FERRY_HEALTH_PORT": str(port),
           "FERRY_TRACE_COLLECT": "0", "FERRY_INVENTORY_INTERVAL_S": "1"}
    ferry = str(Path(sys.executable).with_name("ferry"))
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / f"hosts-{vhost}.log", "wb") as log:  # the child keeps its own copy
        return subprocess.Popen([ferry, "up", "--hosts", ",".join(hosts), "--no-coordinator"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)


async def wait_for(check: Callable[[], bool], timeout: float, what: str, *, poll: float = 0.005) -> None:
    import asyncio

    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(poll)
