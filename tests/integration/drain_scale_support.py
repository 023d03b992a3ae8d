"""Two hosts drained at once under the fleet limits (issue 15's scale tests): 50 VMs on host-a,
20 on host-b, a few operator migrations on the side (two draining sources at outbound 2 hold
only 4 slots: these take the cluster to its limit of 5, so the cluster limit is tested too).

While it runs, a sampler reads the slots held from the store every 100 ms; afterwards the
store's history is replayed (``tests.faults.chaos_limits``), each VM must have moved once, to a
host not drained, with one active plane and its events acted on once."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import Counter
from collections.abc import Awaitable, Callable

from ferry_cli.cluster import build_coordinator
from ferry_coordinator.fleet.queue import EntryState, Limits
from ferry_coordinator.service import CoordinatorService
from ferry_coordinator.store import SagaRecord, SagaStore
from ferry_coordinator.store.postgres import PostgresSagaStore
from ferry_coordinator.timeouts import SagaTimeouts
from tests.faults.chaos_limits import exceeded
from tests.harness import Cluster, check_invariants, new_bus, until

from .drain_support import drain, status

HOSTS = ("host-a", "host-b", "host-c", "host-d", "host-e")
DRAINED = {"host-a": 50, "host-b": 20}
LIMITS = Limits(cluster=5, outbound_per_host=2, inbound_per_host=2)
# 256 MiB at 512 MiB/s: about half a second of pre-copy per VM
MEMORY_MIB, BANDWIDTH_MIBPS = 256, 512
SIDE = [("e-vm0", "host-c"), ("e-vm1", "host-d"), ("e-vm2", "host-c"), ("e-vm3", "host-d")]
# a queued entry aimed at a host whose drain just began is placed again by its own drain's next
# pass (every 0.2 s); until then the dispatcher may still claim it towards that host
REPLACE_S = 1.0
WITH_EVENTS = 4  # VMs of each drained host that get events before and after the drain


class SlotSampler:
    """Every ``period_s``, the entries holding a slot in the store: the peaks cluster-wide, per
    source and per target, and every sample that exceeded a limit."""

    def __init__(self, store: SagaStore, limits: Limits, period_s: float = 0.1) -> None:
        self.store, self.limits, self.period_s = store, limits, period_s
        self.peak = {"cluster": 0, "outbound": 0, "inbound": 0}
        self.problems: list[str] = []
        self.samples = 0
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            held = await self.store.queue.entries(states=(EntryState.STARTED,))
            out_ = Counter(e.source_host for e in held)
            in_ = Counter(e.target_host for e in held)
            now = {"cluster": len(held), "outbound": max(out_.values(), default=0),
                   "inbound": max(in_.values(), default=0)}
            bound = {"cluster": self.limits.cluster, "outbound": self.limits.outbound_per_host,
                     "inbound": self.limits.inbound_per_host}
            for k, n in now.items():
                self.peak[k] = max(self.peak[k], n)
                if n > bound[k]:
                    self.problems.append(f"{k} {n} > {bound[k]}: {[(e.vm_id, e.source_host, e.target_host) for e in held]}")
            self.samples += 1
            await asyncio.sleep(self.period_s)

    async def stop(self) -> None:
        """Stops sampling; a sampler that failed (the store unreadable) fails the test."""
        if self._task.done():
            self._task.result()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def create_all(c: Cluster) -> list[str]:
    """The drained hosts' VMs and the side VMs on host-e, ten created at a time."""
    todo = [(host, f"{host[-1]}-vm{i}") for host, n in DRAINED.items() for i in range(n)]
    todo += [("host-e", vm) for vm, _ in SIDE]
    for i in range(0, len(todo), 10):
        await asyncio.gather(*(c.create_vm(h, vm, memory_mib=MEMORY_MIB, sim_bandwidth_mibps=BANDWIDTH_MIBPS)
                               for h, vm in todo[i : i + 10]))
    return [vm for h, vm in todo if h in DRAINED]


def with_events(vms: list[str]) -> list[str]:
    return [vm for host in DRAINED for vm in [v for v in vms if v[0] == host[-1]][:WITH_EVENTS]]


async def wait_drained(c: Cluster, host: str, timeout: float) -> None:
    """Until the drain of ``host`` ended; a status request that fails (the broker restarting) is
    asked again."""
    async def ended() -> bool:
        try:
            s = await status(c, host)
        except Exception:  # noqa: BLE001 - asked again until the deadline
            await asyncio.sleep(0.5)
            return False
        return s.status != "draining" and s.in_flight == 0 and s.queued == 0
    await until(ended, timeout, f"the drain of {host} to end")


async def drain_two_hosts(c: Cluster, *, during: Callable[[], Awaitable[None]] | None = None,
                          slack_s: float = 0.0, note: str = "", timeout: float = 120.0) -> None:
    """The scenario and its checks. ``during`` runs alongside the drains (faults); ``slack_s``:
    how much older than the release it followed a claim's recorded time may look (a store
    whose transactions wait: the time is read before the wait); ``note`` goes into every
    assertion message (the seed)."""
    store = c.store
    await store.queue.set_limits(LIMITS)
    vms = await create_all(c)
    for vm in with_events(vms):
        await c.send_events(vm, 5)
    sampler = SlotSampler(store, LIMITS)
    try:
        for host in DRAINED:
            await drain(c, host)
        side = [await c.client.migrate(vm, target) for vm, target in SIDE]
        chaos = asyncio.create_task(during()) if during is not None else None
        for host in DRAINED:
            await wait_drained(c, host, timeout)
        if chaos is not None:
            await chaos  # its faults all happened (and were recovered from) before the checks

        async def side_done() -> bool:
            recs = [await store.get(m) for m in side]
            return all(r is not None and r.status in ("completed", "rolled_back", "failed") for r in recs)
        await until(side_done, 60, "the side migrations to end")
    finally:
        await sampler.stop()

    for host, n in DRAINED.items():
        end = await status(c, host)
        # more than planned: a VM that arrived while its host drained (see below) left too
        assert (end.status, end.done, end.failed) == ("drained", end.total, 0) and end.total >= n, (note, end)
    # sampled while it ran: never above a limit, and each limit reached (else nothing was tested)
    assert sampler.problems == [], (note, sampler.problems[:5])
    want = {"cluster": LIMITS.cluster, "outbound": LIMITS.outbound_per_host, "inbound": LIMITS.inbound_per_host}
    assert sampler.peak == want, (note, sampler.peak, sampler.samples)
    # the store's history: every slot from its claim to its release, replayed
    entries = await store.queue.entries()
    assert entries and all(e.state is EntryState.DONE for e in entries if e.vm_id in vms), note
    shifted = [dataclasses.replace(e, started_at=(e.started_at or 0.0) + slack_s) for e in entries if e.started_at is not None]
    assert exceeded(shifted, LIMITS) == [], (note, exceeded(shifted, LIMITS)[:5])
    claimed = {e.migration_id: e.started_at or 0.0 for e in entries}
    wrong = moved_once(vms, await store.list(limit=10_000), claimed, await drain_starts(store))
    where = {vm: {h: await c.host(h).adapter.driver.state(vm) for h in HOSTS} for vm in wrong}
    assert wrong == {}, (note, wrong, "the drivers say:", where)
    for vm in with_events(vms):
        await c.send_events(vm, 3)  # acted on where the VM is now
    for vm in vms:
        loc = c.coordinator.hosts.locate(vm)
        assert loc is not None and loc[0] not in DRAINED, (note, vm, loc)
        await check_invariants(c, vm, loc[0])


async def drain_starts(store: SagaStore) -> dict[str, float]:
    out = {}
    for host in DRAINED:
        d = await store.drains.latest(host)
        assert d is not None
        out[host] = d.created_at
    return out


def moved_once(vms: list[str], records: list[SagaRecord], claimed: dict[str, float],
               drains: dict[str, float]) -> dict[str, list[str]]:
    """The VMs that did not move exactly once (a rolled-back attempt moves nothing; a side
    migration may roll back under faults, so its VM moved at most once). One exception, not a
    fault: a VM whose migration was already under way to the other host when that host's
    drain began lands there and leaves again (twice, the first one claimed its slot before the
    drain began, or before its own drain's next pass placed it again: ``claimed``, per
    migration id; the claim does not itself check cordons, see REPLACE_S)."""
    done: dict[str, list[SagaRecord]] = {}
    every: dict[str, list[str]] = {}
    for rec in records:
        every.setdefault(rec.vm_id, []).append(
            f"{rec.migration_id} {rec.status} {rec.step} {rec.source_host}->{rec.target_host} at {rec.created_at:.3f}")
        if rec.status == "completed":
            done.setdefault(rec.vm_id, []).append(rec)
    wrong = {}
    for vm in set(done) | set(vms):
        recs = sorted(done.get(vm, []), key=lambda r: r.created_at)
        first = recs[0] if recs else None
        landed = (len(recs) == 2 and first is not None and first.target_host in drains
                  and claimed.get(first.migration_id, first.created_at) < drains[first.target_host] + REPLACE_S)
        if not (len(recs) == 1 or landed or (vm not in vms and not recs)):
            wrong[vm] = every.get(vm, [])
    return wrong


async def replica(c: Cluster, url: str, timeouts: SagaTimeouts) -> CoordinatorService:
    """One more coordinator on the PostgreSQL store at ``url``, on a bus of its own."""
    bus = await new_bus("rabbitmq", c.vhost)
    c.buses.append(bus)
    r = build_coordinator(bus, await PostgresSagaStore.open(url), clock=c.clock, timeouts=timeouts)
    await r.start()

    async def known() -> bool:
        return all(r.hosts.known(h) for h in c.hosts)
    await until(known, 10, "the replica to know every host")
    return r
