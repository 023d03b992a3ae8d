"""Placement at fleet scale: time per placement decision on a simulated inventory.

A fleet of H hosts with 20 VMs each (1,000 hosts: 20,000 VMs) is built from ``HostInventory``
messages as the hosts publish them: two driver kinds, zone and disk labels, a tenth of the
VMs in anti-affinity groups, hosts 40-95 % full, a few cordoned or not ready. Each decision
places a random VM of the fleet (its own host excluded, its selector and groups applied) and
the chosen target's reservation is held for the next ten decisions, as migrations in flight.

Both wall-clock and CPU time per decision are kept: on a shared machine the wall-clock p99
also counts the process waiting for a core.

Floor, same run: one pass over the same hosts that reads each one's free memory and keeps
the largest, the least any decision that looks at every host pays. Reported: median and p99
per decision, and their ratio to the floor, for 100 to 1,000 hosts. Goal: < 1 ms median at
1,000 hosts.

Run: ``make bench-placement`` or ``.venv/bin/python bench/placement.py --help``.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import median, pct, ratio, table, write_results  # noqa: E402

from ferry_common.messages.domain import VmPlacement, VmSpec  # noqa: E402
from ferry_common.messages.public import HostInventory  # noqa: E402
from ferry_coordinator.fleet.placement import Demand, place  # noqa: E402
from ferry_coordinator.fleet.view import FleetView, HostView  # noqa: E402

VMS_PER_HOST = 20


def inventories(hosts: int, rng: random.Random) -> list[HostInventory]:
    out = []
    for i in range(hosts):
        driver = "qemu" if i % 10 == 0 else "sim"
        capacity = rng.choice([256, 384, 512]) * 1024
        fill = rng.uniform(0.4, 0.95)
        vms = []
        for j in range(VMS_PER_HOST):
            mem = max(512, int(capacity * fill / VMS_PER_HOST) // 256 * 256)
            placement = None
            if rng.random() < 0.1:
                placement = VmPlacement(anti_affinity=[f"group-{rng.randrange(hosts // 5 or 1)}"])
            elif rng.random() < 0.2:
                placement = VmPlacement(host_selector={"disk": "ssd"})
            vms.append(VmSpec(vm_id=f"vm-{i}-{j}", memory_mib=mem, driver=driver, placement=placement))
        labels = {"zone": f"z{i % 4}", "disk": "ssd" if i % 3 else "hdd"}
        out.append(HostInventory(host=f"host-{i:04}", vms=vms, capacity_mib=capacity, driver=driver,
                                 labels=labels, period_s=1.0))
    return out


def floor_pass(hosts: list[HostView]) -> int:
    best = 0
    for h in hosts:
        free = h.free_mib
        if free > best:
            best = free
    return best


def run(n_hosts: int, decisions: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    invs = inventories(n_hosts, rng)
    t0 = time.perf_counter()
    view = FleetView.from_inventories(invs)
    build_s = time.perf_counter() - t0
    for name in rng.sample(sorted(view.hosts), max(1, n_hosts // 50)):
        if rng.random() < 0.5:
            view.cordon(name)
        else:
            view.set_ready(name, False)
    demands = [(Demand.of(vm, inv.host)) for inv in invs for vm in inv.vms]
    hosts = view.values()
    # the fleet is built once and lives on: a full collection of its objects is not a decision's cost
    gc.collect()
    gc.freeze()
    held: deque[tuple[str, int]] = deque()
    times, cpu, floors, fitted = [], [], [], 0
    for _ in range(decisions):
        d = rng.choice(demands)
        t, c = time.perf_counter_ns(), time.thread_time_ns()
        result = place(d, hosts, limit=8)
        times.append((time.perf_counter_ns() - t) / 1e3)
        cpu.append((time.thread_time_ns() - c) / 1e3)
        t = time.perf_counter_ns()
        floor_pass(hosts)
        floors.append((time.perf_counter_ns() - t) / 1e3)
        if result.fits:
            fitted += 1
            view.reserve(result.ranked[0], d.memory_mib)
            held.append((result.ranked[0], d.memory_mib))
            if len(held) > 10:
                view.unreserve(*held.popleft())
    out = {
        "hosts": n_hosts,
        "vms": n_hosts * VMS_PER_HOST,
        "decisions": decisions,
        "fitted": fitted,
        "median_us": median(times),
        "p99_us": pct(times, 99),
        # CPU time of the decision: the wall-clock p99 also counts this process being preempted
        "cpu_median_us": median(cpu),
        "cpu_p99_us": pct(cpu, 99),
        "floor_median_us": median(floors),
        "median_over_floor": ratio(median(times), median(floors)),
        "view_build_ms": build_s * 1e3,
    }
    gc.unfreeze()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,250,500,1000", help="host counts (20 VMs each)")
    ap.add_argument("--decisions", type=int, default=2000, help="placement decisions per size")
    ap.add_argument("--seed", type=int, default=15)
    args = ap.parse_args()
    rows = [run(int(n), args.decisions, args.seed) for n in args.sizes.split(",")]
    base = rows[0]
    for r in rows:
        r["median_vs_smallest"] = ratio(r["median_us"], base["median_us"])
    print(table(
        [[r["hosts"], r["vms"], r["median_us"], r["p99_us"], r["cpu_p99_us"], r["floor_median_us"], r["median_over_floor"],
          r["median_vs_smallest"], r["fitted"]] for r in rows],
        ["hosts", "VMs", "median µs", "p99 µs", "CPU p99 µs", "floor µs", "÷ floor", "÷ smallest", "fitted"],
    ))
    goal = rows[-1]["median_us"] < 1000.0
    print(f"goal (< 1 ms median at {rows[-1]['hosts']} hosts): {'MET' if goal else 'MISSED'}")
    path = write_results("placement", {"seed": args.seed, "decisions": args.decisions, "sizes": rows,
                                       "goal_median_us": 1000.0, "goal_met": goal})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
