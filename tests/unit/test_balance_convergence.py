"""Full automation on a small simulated fleet: the imbalance converges under the threshold,
no VM moves twice within its cooldown, never more automatic migrations in flight than allowed."""

from __future__ import annotations

import random

from ferry_common.clock import FakeClock
from ferry_coordinator.balance import (
    AutomationPolicy,
    BalanceCycle,
    Balancer,
    BalanceRules,
    CapacityPlacement,
    Fleet,
    HostLoad,
    RecommendationBook,
    VmLoad,
    WorkInFlight,
    imbalance,
)
from ferry_coordinator.balance.metric import host_utilisation

ROUND_S = 60.0
MIGRATION_ROUNDS = 2  # a migration spans two evaluations: the in-flight limit is exercised


async def test_full_mode_converges_without_storms() -> None:
    rng = random.Random(7)
    clock = FakeClock()
    rules = BalanceRules(interval_s=ROUND_S, cooldown_s=1800.0, max_in_flight=2)
    cycle = BalanceCycle(Balancer(CapacityPlacement(), rules, clock), AutomationPolicy("full"),
                         RecommendationBook(clock))
    hosts = [f"h{i}" for i in range(8)]
    cpu = {f"v{i}": rng.uniform(0.5, 3.0) for i in range(40)}
    where = {v: hosts[i % 2] for i, v in enumerate(cpu)}  # everything on two of eight hosts
    moving: dict[str, tuple[str, float]] = {}  # vm -> (target, done at)
    started: dict[str, list[float]] = {}
    series = []
    for _ in range(120):
        now = clock.monotonic()
        for v, (target, done) in list(moving.items()):
            if done <= now:
                where[v] = target
                del moving[v]
        for v in cpu:  # a little noise on every sample
            cpu[v] = max(0.1, cpu[v] + rng.gauss(0.0, 0.05))
        fleet = Fleet.of(
            HostLoad(h, 16, 65536, tuple(VmLoad(v, 2048, 4, cpu[v], 512.0) for v in cpu if where[v] == h),
                     reserved_mib=2048 * sum(1 for t, _ in moving.values() if t == h))
            for h in hosts)
        series.append(imbalance([host_utilisation(h) for h in fleet.hosts]))
        result = cycle.run(fleet, WorkInFlight(automatic=frozenset(moving)))
        for a in result.actions:
            m = a.proposal.move
            assert m.vm_id not in moving and where[m.vm_id] == m.source
            moving[m.vm_id] = (m.target, now + MIGRATION_ROUNDS * ROUND_S - 1)
            started.setdefault(m.vm_id, []).append(now)
        assert len(moving) <= rules.max_in_flight
        await clock.advance(ROUND_S)
    assert series[0] > 1.0
    assert max(series[-20:]) <= rules.threshold, series[-20:]
    for times in started.values():
        assert all(b - a >= rules.cooldown_s for a, b in zip(times, times[1:], strict=False)), times
    assert 0 < sum(len(t) for t in started.values()) < 60
