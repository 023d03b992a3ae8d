"""The simulated fleet of ``balance_sim.py``: hosts, VMs, a seeded load model, migrations
that take time, and the three strategies compared (none, naive greedy, Ferry's balancer).

Load model: VMs belong to services of ``SERVICE_SIZE`` VMs; a service is idle, normal or busy,
and changes phase now and then (a phase lasts about ``PHASE_MEAN_S``), every VM of it
together. Each VM's CPU follows its service's phase with a random walk of its own around it,
its memory in use a slow walk. A service's VMs were created in a batch and start mostly on
one host, as fleets placed by free memory alone do: busy services make hot hosts.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from ferry_coordinator.balance import BalanceCycle, Fleet, HostLoad, Move, VmLoad, WorkInFlight
from ferry_coordinator.balance.metric import imbalance, utilisation

HOST_CPUS = 64
HOST_MIB = 256 * 1024
SERVICE_SIZE = 10
PHASES = (0.05, 0.35, 0.85)  # share of its vCPUs a VM uses when its service is idle, normal, busy
PHASE_MEAN_S = 3 * 3600.0
BANDWIDTH_MIB_S = 300.0  # a migration takes SETUP_S plus its memory over this
SETUP_S = 5.0


class SimClock:
    """The simulation's clock (:class:`ferry_common.clock.Clock`): moves only when told."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return 1_800_000_000.0 + self.t

    def monotonic(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)


@dataclass
class SimVm:
    vm_id: str
    service: int
    vcpus: int
    memory_mib: int
    cpu: float = 0.0
    mem_share: float = 0.5


@dataclass
class LoadModel:
    """Every VM's load, advanced one step at a time; the same for every strategy of a run."""

    vms: list[SimVm]
    rng: random.Random
    phase: list[int] = field(default_factory=list)

    @classmethod
    def build(cls, n_vms: int, rng: random.Random) -> LoadModel:
        vms = []
        for i in range(n_vms):
            vcpus = rng.choices((1, 2, 4, 8), weights=(30, 30, 25, 15))[0]
            vms.append(SimVm(f"vm-{i:05d}", i // SERVICE_SIZE, vcpus, vcpus * 2048))
        model = cls(vms, rng, [rng.randrange(len(PHASES)) for _ in range(n_vms // SERVICE_SIZE + 1)])
        for vm in vms:
            vm.cpu = PHASES[model.phase[vm.service]] * vm.vcpus
            vm.mem_share = rng.uniform(0.3, 0.9)
        return model

    def step(self, dt: float) -> None:
        rng = self.rng
        switch = dt / PHASE_MEAN_S
        for s in range(len(self.phase)):
            if rng.random() < switch:
                self.phase[s] = rng.randrange(len(PHASES))
        for vm in self.vms:
            target = PHASES[self.phase[vm.service]] * vm.vcpus
            # a walk pulled toward the phase's level: moves of about a tenth of a vCPU a minute
            vm.cpu += 0.2 * (target - vm.cpu) + rng.gauss(0.0, 0.1 * vm.vcpus ** 0.5)
            vm.cpu = min(max(vm.cpu, 0.0), float(vm.vcpus))
            vm.mem_share = min(max(vm.mem_share + rng.gauss(0.0, 0.01), 0.1), 1.0)


def initial_placement(model: LoadModel, n_hosts: int, rng: random.Random) -> dict[str, int]:
    """VM -> host: each service's VMs mostly on one host (created in a batch), the rest random."""
    where: dict[str, int] = {}
    free = [HOST_MIB] * n_hosts
    for vm in model.vms:
        home = vm.service % n_hosts
        h = home if rng.random() < 0.6 else rng.randrange(n_hosts)
        while free[h] < vm.memory_mib:
            h = rng.randrange(n_hosts)
        free[h] -= vm.memory_mib
        where[vm.vm_id] = h
    return where


@dataclass
class InFlight:
    vm_id: str
    source: int
    target: int
    done_at: float


@dataclass
class Strategy:
    """One strategy's own copy of the placement, its migrations and its figures."""

    name: str
    where: dict[str, int]
    decide: Callable[[Strategy, LoadModel, float], list[Move]]
    moving: dict[str, InFlight] = field(default_factory=dict)
    migrations: int = 0
    series: list[float] = field(default_factory=list)
    max_in_flight: int = 0
    moved_at: dict[str, list[float]] = field(default_factory=dict)
    decide_s: list[float] = field(default_factory=list)  # wall time of each round's decision

    def start(self, moves: list[Move], model: LoadModel, now: float) -> None:
        by_id = {vm.vm_id: vm for vm in model.vms}
        for m in moves:
            vm = by_id[m.vm_id]
            self.moving[m.vm_id] = InFlight(m.vm_id, int(m.source[5:]), int(m.target[5:]),
                                            now + SETUP_S + vm.memory_mib / BANDWIDTH_MIB_S)
            self.migrations += 1
            self.moved_at.setdefault(m.vm_id, []).append(now)
        self.max_in_flight = max(self.max_in_flight, len(self.moving))

    def finish(self, now: float) -> None:
        for vm_id, f in list(self.moving.items()):
            if f.done_at <= now:
                self.where[vm_id] = f.target
                del self.moving[vm_id]


def host_name(i: int) -> str:
    return f"host-{i:03d}"


def snapshot(s: Strategy, model: LoadModel, n_hosts: int) -> Fleet:
    """What the coordinator would see: each VM on its host (until its move completes), with
    the memory of inbound moves reserved on their targets."""
    per_host: list[list[VmLoad]] = [[] for _ in range(n_hosts)]
    for vm in model.vms:
        per_host[s.where[vm.vm_id]].append(
            VmLoad(vm.vm_id, vm.memory_mib, vm.vcpus, vm.cpu, vm.mem_share * vm.memory_mib))
    reserved = [0] * n_hosts
    sizes = {vm.vm_id: vm.memory_mib for vm in model.vms}
    for f in s.moving.values():
        reserved[f.target] += sizes[f.vm_id]
    return Fleet(tuple(HostLoad(host_name(i), HOST_CPUS, HOST_MIB, tuple(per_host[i]), reserved[i])
                       for i in range(n_hosts)))


def host_utils(s: Strategy, model: LoadModel, n_hosts: int) -> list[float]:
    cpu = [0.0] * n_hosts
    mem = [0.0] * n_hosts
    for vm in model.vms:
        h = s.where[vm.vm_id]
        cpu[h] += vm.cpu
        mem[h] += vm.mem_share * vm.memory_mib
    return [utilisation(cpu[i], mem[i], HOST_CPUS, HOST_MIB) for i in range(n_hosts)]


def fleet_imbalance(s: Strategy, model: LoadModel, n_hosts: int) -> float:
    return imbalance(host_utils(s, model, n_hosts))


def no_balancing(s: Strategy, model: LoadModel, now: float) -> list[Move]:
    return []


def greedy(n_hosts: int) -> Callable[[Strategy, LoadModel, float], list[Move]]:
    """The naive balancer: every round, the busiest VM of the hottest host goes to the coolest
    host its memory fits on. No threshold, no gain check, no cooldown, no limit."""

    def decide(s: Strategy, model: LoadModel, now: float) -> list[Move]:
        utils = host_utils(s, model, n_hosts)
        hottest = max(range(n_hosts), key=utils.__getitem__)
        on_it = [vm for vm in model.vms if s.where[vm.vm_id] == hottest and vm.vm_id not in s.moving]
        if not on_it:
            return []
        vm = max(on_it, key=lambda v: v.cpu)
        free = [HOST_MIB] * n_hosts
        for v in model.vms:
            free[s.where[v.vm_id]] -= v.memory_mib
        for f in s.moving.values():
            free[f.target] -= next(v.memory_mib for v in model.vms if v.vm_id == f.vm_id)
        fits = [h for h in range(n_hosts) if h != hottest and free[h] >= vm.memory_mib]
        if not fits:
            return []
        target = min(fits, key=utils.__getitem__)
        return [Move(vm.vm_id, host_name(hottest), host_name(target))]

    return decide


def ferry(cycle: BalanceCycle, n_hosts: int) -> Callable[[Strategy, LoadModel, float], list[Move]]:
    """Ferry's balancer through the coordinator's entry point (:class:`BalanceCycle`): the
    actions of a round are started; at the full level nothing is left as a recommendation."""

    def decide(s: Strategy, model: LoadModel, now: float) -> list[Move]:
        result = cycle.run(snapshot(s, model, n_hosts), WorkInFlight(automatic=frozenset(s.moving)))
        return [a.proposal.move for a in result.actions]

    return decide
