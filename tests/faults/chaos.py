"""A randomized chaos run: many migrations at once over the process cluster (tests/faults/procs.py)
while faults of the suite's catalogue strike at random moments, then every invariant is checked.

Faults: SIGKILL of a service or the coordinator (restarted after a moment), a TCP cut or a stall
of one process's broker connection (tests/faults/proxy.py), a RabbitMQ restart (optional: it
stops the machine's broker for everyone), and duplicated events (a VM event sent again with its
id). The seed fixes the plan: which VMs move where, which faults, on what, after what pauses;
the interleaving with the processes is the machine's. Each migration is one row of the fault
table (tests/faults/report.py), under the faults that struck while it ran.

    python -m tests.faults.chaos --seed 7 --migrations 1000 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry_common.bus.topology import COORDINATOR_QUERY
from ferry_common.errors import FerryError
from ferry_common.messages.commands import ListMigrations, MigrationList
from ferry_common.messages.public import VmEvent
from tests.faults.cases import step_at
from tests.faults.chaos_limits import limit_violations
from tests.faults.procs import HOSTS, ProcCluster, Session
from tests.faults.report import Case, Recorder
from tests.harness import rabbitmqctl

KINDS = ("kill", "cut", "stall", "duplicate", "broker-restart")


@dataclass
class Struck:
    kind: str  # kill:coordinator, cut:host-a/sensor, ...
    start: float
    end: float = 0.0


@dataclass
class Chaos:
    procs: ProcCluster
    sess: Session
    rng: random.Random
    migrations: int
    concurrency: int
    broker_restarts: bool
    seed: int
    pause_s: tuple[float, float] = (0.5, 3.0)
    stop_at: float = float("inf")  # monotonic: no migration starts after it (a time budget)
    struck: list[Struck] = field(default_factory=list)
    runs: list[tuple[str, str, str, str, float, float]] = field(default_factory=list)  # vm, mid, src, dst, t0, t1
    where: dict[str, str] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    started: int = 0
    stuck: bool = False

    # ---- migrations ------------------------------------------------------------------
    async def worker(self, n: int) -> None:
        vm = f"chaos-{n}"
        self.where[vm] = HOSTS[n % 2]
        await retry(lambda: self.sess.create_vm(vm, self.where[vm], sim_bandwidth_mibps=512))
        k = 0
        while self.started < self.migrations and time.monotonic() < self.stop_at:
            self.started += 1
            k += 1
            source = self.where[vm]
            target = next(h for h in HOSTS if h != source)
            await self.sess.send_events(vm, 3)
            stop = asyncio.Event()
            feeder = asyncio.create_task(self.sess.feed(vm, stop, every_s=0.1))
            mid = f"chaos-{self.seed}-{n}-{k}"
            t0 = time.time()
            try:
                await retry(functools.partial(self.sess.client.migrate, vm, target, migration_id=mid))
                try:
                    rec = await self.sess.outcome(mid, timeout=300)
                except TimeoutError:
                    self.stuck = True  # the judge reports its record; this VM moves no more
                    self.runs.append((vm, mid, source, target, t0, time.time()))
                    return
                if rec["status"] == "completed":
                    self.where[vm] = target
            finally:
                stop.set()
                await feeder
            self.runs.append((vm, mid, source, target, t0, time.time()))

    # ---- faults ------------------------------------------------------------------------
    async def faults(self) -> None:
        kinds = [k for k in KINDS if k != "broker-restart" or self.broker_restarts]
        names = list(self.procs.procs)
        while not self.done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), self.rng.uniform(*self.pause_s))
                return
            kind = self.rng.choice(kinds)
            name = self.rng.choice(names)
            hold = self.rng.uniform(0.3, 2.0)
            s = Struck(kind if kind in ("duplicate", "broker-restart") else f"{kind}:{_role(name)}", time.time())
            self.struck.append(s)
            if kind == "kill":
                await asyncio.to_thread(self.procs.kill, name)
                await asyncio.sleep(hold)
                await self.revive()
            elif kind == "cut":
                self.procs.proxies.cut(name)
            elif kind == "stall":
                await self.procs.proxies.stall(name, hold)
            elif kind == "duplicate":
                await self.duplicate()
            else:
                await asyncio.to_thread(broker_restart, hold)
                await self.revive()
            s.end = time.time()

    async def revive(self) -> None:
        """What a supervisor (systemd, Kubernetes) does: start every dead process again until
        it is ready; one that starts while the broker is away exits, and goes again."""
        for _ in range(60):
            for name, p in self.procs.procs.items():
                if not p.alive:
                    self.procs.spawn(name)
            try:
                await asyncio.to_thread(self.procs.wait_ready, None, 60.0)
                return
            except RuntimeError:
                await asyncio.sleep(1.0)
        raise RuntimeError("processes did not come back")

    async def duplicate(self) -> None:
        """One event of a VM sent again, same id: the managed object must act on it once."""
        vms = [vm for vm, evs in self.sess.sent.items() if evs]
        if vms:
            ev = self.rng.choice(self.sess.sent[self.rng.choice(sorted(vms))][-5:])
            with contextlib.suppress(FerryError):
                await self.sess.client.send_event(VmEvent.model_validate(ev.model_dump()))

    # ---- the run and its verdict ------------------------------------------------------
    async def run(self) -> Recorder:
        rec = Recorder()
        faults = asyncio.create_task(self.faults())
        try:
            await asyncio.gather(*(self.worker(n) for n in range(self.concurrency)))
        finally:
            self.done.set()
            await faults
        await self.revive()
        await self.judge(rec)
        return rec

    async def judge(self, rec: Recorder) -> None:
        bad_vm: dict[str, list[str]] = {}
        for vm, where in self.where.items():
            await self.sess.send_events(vm, 2)  # still acted on, by the one that has it
            bad_vm[vm] = await self.sess.verdict(vm, where, HOSTS)
            # clean-up commands of a rollback may still wait in a queue behind a stall: what
            # is wrong must stay wrong for a while to count
            for _ in range(10):
                if not bad_vm[vm]:
                    break
                await asyncio.sleep(2.0)
                bad_vm[vm] = await self.sess.verdict(vm, where, HOSTS)
        last_of: dict[str, str] = {}
        for vm, mid, *_ in self.runs:
            last_of[vm] = mid
        for vm, mid, _src, _dst, t0, t1 in self.runs:
            r = await retry(functools.partial(self.record, mid))
            hit = [s for s in self.struck if s.start <= t1 and (s.end or t1) >= t0]
            kind = "+".join(sorted({s.kind.split(":")[0] for s in hit})) or "none"
            case = Case(kind, step_at(r, hit[0].start) if (r and hit) else "-", r["status"] if r else "unknown",
                        detail=" ".join(s.kind for s in hit))
            if r is None:
                case.violations.append("no saga record")
            elif r["status"] not in ("completed", "rolled_back"):
                case.violations.append(f"ended {r['status']}: {r['data'].get('reason')}")
            seen = self.sess.terminal_events(mid)
            if r is not None and seen - {r["status"]}:
                case.violations.append(f"announced {sorted(seen)}, recorded {r['status']}")
            if last_of[vm] == mid:  # a VM's state is judged once, with its last migration
                case.violations += bad_vm[vm]
            rec.add(case)
        for v in await limit_violations(self.procs.root / "sagas.db"):
            rec.add(Case("limits", "-", "completed", [v]))


    async def record(self, mid: str) -> dict[str, Any] | None:
        """The saga record of ``mid`` by its id (the session's look-up sees the newest 500)."""
        ans = await self.sess.client.endpoint.request(COORDINATOR_QUERY, ListMigrations(migration_id=mid, limit=1),
                                                      timeout=10.0)
        assert isinstance(ans, MigrationList)
        return next((dict(m) for m in ans.migrations if m["migration_id"] == mid), None)


def _role(name: str) -> str:
    return name if name == "coordinator" else name.split("/", 1)[1]


async def retry(call: Any, attempts: int = 150) -> Any:
    """A request sent while its receiver or the broker is down: send again (same ids)."""
    for i in range(attempts):
        try:
            return await call()
        except (FerryError, TimeoutError):
            if i == attempts - 1:
                raise
            await asyncio.sleep(0.4)


def broker_restart(down_s: float) -> None:
    try:
        subprocess.run(rabbitmqctl("stop_app"), check=True, capture_output=True, timeout=120)
        time.sleep(down_s)
    finally:
        subprocess.run(rabbitmqctl("start_app"), check=False, capture_output=True, timeout=120)
        subprocess.run(rabbitmqctl("await_startup", "--timeout", "60"), check=False, capture_output=True)


async def chaos_run(seed: int, migrations: int, concurrency: int, *, broker_restarts: bool = True,
                    pause_s: tuple[float, float] = (0.5, 3.0), max_s: float | None = None) -> Recorder:
    """Start the process cluster in a private vhost, run, judge, tear down."""
    from tests.harness import drop_vhost, make_vhost

    vhost = make_vhost()
    root = Path(tempfile.mkdtemp(prefix=f"ferry-chaos-{seed}-"))
    procs = ProcCluster(root, vhost)
    try:
        await asyncio.to_thread(procs.start_all)
        sess = await Session.open(vhost)
        try:
            chaos = Chaos(procs, sess, random.Random(seed), migrations, concurrency, broker_restarts, seed, pause_s)
            if max_s is not None:
                chaos.stop_at = time.monotonic() + max_s
            return await chaos.run()
        finally:
            await sess.close()
    finally:
        await asyncio.to_thread(procs.stop_all)
        drop_vhost(vhost)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.faults.chaos", description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--migrations", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=8, help="migrations in flight at once")
    ap.add_argument("--no-broker-restart", action="store_true", help="leave the machine's RabbitMQ running")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="start no migration after this long (the table says how many ran)")
    args = ap.parse_args(argv)
    started = time.monotonic()
    rec = asyncio.run(chaos_run(args.seed, args.migrations, args.concurrency, broker_restarts=not args.no_broker_restart,
                                 max_s=args.max_seconds))
    print(f"chaos seed {args.seed}: {len(rec.cases)} migrations, concurrency {args.concurrency}, "
          f"{time.monotonic() - started:.0f}s")
    print(rec.render())
    return 1 if rec.violations() else 0


if __name__ == "__main__":
    sys.exit(main())
