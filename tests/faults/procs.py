"""Ferry as real processes on the real RabbitMQ: one process per service, each behind its own
fault proxy, in a private vhost; and what a fault case does with them.

Processes: ``coordinator`` and ``<host>/<service>`` for the four services of every host
(``ferry service NAME --host H``), each with its health port, its durable state in the run's
state dir (the coordinator's sagas in one SQLite store) and ``AMQP_URL`` pointing at its
proxy, so any one of them can be killed (SIGKILL), stopped, restarted on the same state, or
cut off and stalled at the network level.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ferry_cli.client import TERMINAL, FerryClient
from ferry_common.bus.amqp import AmqpBus
from ferry_common.endpoint import Endpoint
from ferry_common.errors import FerryError
from ferry_common.messages.domain import Event
from ferry_common.messages.public import MigrationStatusEvent, VmEvent
from ferry_testing.sample import MODULES, graph, vm_spec
from ferry_testing.verify import inspect_all, problems, replay, state_problems
from tests.faults.proxy import ProxyThread
from tests.harness import AMQP_PORT, amqp_url

REPO = Path(__file__).resolve().parents[2]
FERRY = str(Path(sys.executable).with_name("ferry"))
SERVICES = ("sensor", "managed_object", "migration_policy", "hypervisor_adapter")
HOSTS = ("host-a", "host-b")
# saga timing for the processes: short, so a dead service or coordinator costs seconds
PROCESS_ENV = {
    "FERRY_AUTH": "none",
    "FERRY_SAGA_LEASE_S": "3",
    "FERRY_SAGA_REPLY_S": "2",
    "FERRY_SAGA_STATUS_POLL_S": "0.5",
    # every step announced: the suite aims its faults at steps by the progress statuses
    "FERRY_PROGRESS_INTERVAL_S": "0",
    "FERRY_INVENTORY_INTERVAL_S": "0.5",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """One service process: how to start it and the running child, if any."""

    name: str
    argv: list[str]
    env: dict[str, str]
    health_port: int
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _log: IO[bytes] | None = None

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


@dataclass
class ProcCluster:
    """Coordinator and every host service as processes in ``vhost``, state under ``root``."""

    root: Path
    vhost: str
    hosts: tuple[str, ...] = HOSTS
    procs: dict[str, Proc] = field(default_factory=dict)
    proxies: ProxyThread = field(default_factory=ProxyThread)

    def __post_init__(self) -> None:
        self.proxies.start()
        base = {**os.environ, **PROCESS_ENV, "FERRY_STATE_DIR": str(self.root / "state"),
                "FERRY_STORE_URL": f"sqlite:///{self.root / 'sagas.db'}"}
        names = [("coordinator", ["service", "coordinator"])]
        names += [(f"{h}/{s}", ["service", s, "--host", h]) for h in self.hosts for s in SERVICES]
        for name, args in names:
            port = self.proxies.add(name, upstream_port=AMQP_PORT)
            env = {**base, "AMQP_URL": f"amqp://guest:guest@127.0.0.1:{port}/{self.vhost}",
                   "FERRY_HEALTH_PORT": str(free_port())}
            log_path = self.root / "logs" / f"{name.replace('/', '-')}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self.procs[name] = Proc(name, [FERRY, *args], env, int(env["FERRY_HEALTH_PORT"]), log_path)

    # ---- lifecycle -------------------------------------------------------------------
    def spawn(self, name: str) -> None:
        p = self.procs[name]
        assert not p.alive, f"{name} is already running"
        if p._log is not None:
            p._log.close()
        p._log = open(p.log_path, "ab")  # noqa: SIM115 - kept open while the child runs
        p._log.write(f"\n---- start {p.starts + 1} at {time.time():.3f}\n".encode())
        p._log.flush()
        p.popen = subprocess.Popen(p.argv, env=p.env, stdout=p._log, stderr=subprocess.STDOUT, cwd=str(self.root))
        p.starts += 1

    def ready(self, name: str) -> bool:
        p = self.procs[name]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{p.health_port}/readyz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def wait_ready(self, names: list[str] | None = None, timeout: float = 60.0) -> None:
        names = names or list(self.procs)
        deadline = time.monotonic() + timeout
        for name in names:
            while not self.ready(name):
                p = self.procs[name]
                if not p.alive:
                    raise RuntimeError(f"{name} exited with {p.popen.returncode if p.popen else None}; see {p.log_path}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} not ready; see {p.log_path}")
                time.sleep(0.05)

    def start_all(self) -> None:
        for name in self.procs:
            if not self.procs[name].alive:
                self.spawn(name)
        self.wait_ready()

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """``kill -9`` (or ``sig``) and reap: nothing of the process's shutdown runs."""
        p = self.procs[name]
        if p.popen is None or p.popen.poll() is not None:
            return
        p.popen.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.popen.wait(20)
        if p.popen.poll() is None:
            p.popen.kill()
            p.popen.wait(10)

    def signal(self, name: str, sig: int) -> None:
        """Send ``sig`` and return (SIGSTOP/SIGCONT: freeze and thaw the process)."""
        p = self.procs[name]
        if p.popen is not None and p.popen.poll() is None:
            p.popen.send_signal(sig)

    async def restart(self, name: str) -> None:
        """Start ``name`` again on the same state and wait until it is ready."""
        self.spawn(name)
        await asyncio.to_thread(self.wait_ready, [name])

    def stop_all(self) -> None:
        """SIGTERM to every process at once, then reap them (SIGKILL after 20 s)."""
        for p in self.procs.values():
            if p.alive and p.popen is not None:
                p.popen.send_signal(signal.SIGTERM)
        for name in self.procs:
            self.kill(name, signal.SIGTERM)
        for p in self.procs.values():
            if p._log is not None:
                p._log.close()
                p._log = None
        self.proxies.stop()

    def log_tail(self, name: str, lines: int = 30) -> str:
        text = self.procs[name].log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


# ---- the test's side: a client, events, outcomes, the verdict ---------------------------
@dataclass
class Session:
    """What one test holds: a client in the vhost and the events it sent, per VM."""

    client: FerryClient
    bus: AmqpBus
    sent: dict[str, list[Event]] = field(default_factory=dict)
    ts: float = 0.0
    statuses: list[MigrationStatusEvent] = field(default_factory=list)

    @classmethod
    async def open(cls, vhost: str) -> Session:
        bus = AmqpBus(amqp_url(vhost), name="ferry-faults-client")
        await bus.connect()
        client = FerryClient(Endpoint(bus, "client/faults"), timeout=5.0)
        await client.watch()
        s = cls(client, bus)
        s.statuses = client._history
        return s

    async def close(self) -> None:
        await self.client.close()
        await self.bus.close()

    async def create_vm(self, vm_id: str, host: str, **params: Any) -> None:
        spec = vm_spec(vm_id, memory_mib=256, **params)
        await self.client.create_vm(host, spec, graph(vm_id), MODULES)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(FerryError, AssertionError):
                placement = await self.client.placement()
                # both hosts known too: a migration to a host not yet seen would be rejected
                if vm_id in placement.get(host, []) and all(h in placement for h in HOSTS):
                    return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"the coordinator never saw {vm_id} on {host}")

    async def send_events(self, vm_id: str, n: int) -> None:
        from ferry_testing.sample import event

        out = self.sent.setdefault(vm_id, [])
        for _ in range(n):
            self.ts += 1.0
            ev = event(vm_id, len(out), 1_000_000.0 + self.ts)
            for attempt in range(100):  # a publish without a confirm is sent again (same id)
                try:
                    await self.client.send_event(VmEvent.model_validate(ev.model_dump()))
                    break
                except FerryError:
                    if attempt == 99:
                        raise
                    await asyncio.sleep(0.2)
            out.append(ev)

    async def feed(self, vm_id: str, stop: asyncio.Event, every_s: float = 0.03) -> None:
        """Events while the migration runs, until ``stop``."""
        while not stop.is_set():
            await self.send_events(vm_id, 1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)

    async def record(self, mid: str) -> dict[str, Any] | None:
        """The saga record as the coordinator's store has it (None while no coordinator answers)."""
        try:
            rows = await self.client.migrations(limit=500)
        except (FerryError, AssertionError, TimeoutError):
            return None
        return next((r for r in rows if r["migration_id"] == mid), None)

    async def outcome(self, mid: str, timeout: float = 90.0) -> dict[str, Any]:
        """Wait for the terminal record (the store is the truth: status events may be lost
        while the broker is down)."""
        deadline = time.monotonic() + timeout
        rec = None
        while time.monotonic() < deadline:
            rec = await self.record(mid) or rec
            if rec is not None and rec["status"] in TERMINAL:
                return rec
            await asyncio.sleep(0.25)
        raise TimeoutError(f"migration {mid} did not end within {timeout:g}s: {rec and rec['status']}")

    async def wait_step(self, mid: str, step: str, order: tuple[str, ...], timeout: float = 30.0) -> str:
        """Wait until the saga is at ``step`` or beyond it (or ended); returns where it is."""
        want = order.index(step)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            here = self.current_step(mid)
            if here is not None and (here == "ended" or here not in order or order.index(here) >= want):
                return here
            await asyncio.sleep(0.002)
        raise TimeoutError(f"migration {mid} never reached {step}")

    def current_step(self, mid: str) -> str | None:
        last = None
        for e in self.statuses:
            if e.migration_id != mid:
                continue
            if e.status in TERMINAL:
                return "ended"
            if e.status == "failed":
                last = "compensate"
            elif e.status == "progress" and e.step and e.detail.get("percent") is None:
                last = e.step
        return last

    def terminal_events(self, mid: str) -> set[str]:
        return {e.status for e in self.statuses if e.migration_id == mid and e.status in TERMINAL}

    async def settle(self, vm_id: str, hosts: tuple[str, ...], timeout: float = 20.0) -> None:
        want = {e.id for e in self.sent.get(vm_id, [])}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got: set[str] = set()
            with contextlib.suppress(FerryError, AssertionError):
                seen = await inspect_all(self.client, list(hosts), vm_id)
                for s in seen.values():
                    got.update(s["managed_object"]["ledger"].get(vm_id, []))
                if want <= got:
                    return
            await asyncio.sleep(0.2)

    async def verdict(self, vm_id: str, where: str, hosts: tuple[str, ...]) -> list[str]:
        """Everything wrong with ``vm_id`` on ``where``: the invariants and the policy state."""
        await self.settle(vm_id, hosts)
        seen: dict[str, Any] = {}
        for attempt in range(20):
            try:
                seen = await inspect_all(self.client, list(hosts), vm_id)
                break
            except (FerryError, AssertionError):
                if attempt == 19:
                    return ["cannot inspect every service"]
                await asyncio.sleep(0.5)
        sent = self.sent.get(vm_id, [])
        out = problems(seen, vm_id, where, sent)
        if not out:
            out += state_problems(seen, vm_id, where, replay(graph(vm_id), sent))
        return out
