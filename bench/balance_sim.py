"""Fleet balancing simulation: no balancing, a naive greedy balancer and Ferry's, in one run.

A seeded fleet (default 100 hosts, 2,000 VMs; ``_balance_fleet.py`` describes the load model)
runs for simulated hours on a scaled clock: every round (60 s of simulated time) the loads
take a step, each strategy sees its own copy of the placement and may start migrations, which
take time (setup plus memory over a link) before the VM counts on its new host. All three see
the same loads. Reported per strategy: the imbalance over time (coefficient of variation of
host utilisation, ``ferry_coordinator.balance.metric``), the fraction of rounds at or under
the threshold, migrations per hour, VMs moved again within the cooldown, and the most
migrations in flight at once. Goal: under the threshold at least 95 % of the time, with fewer
migrations than the greedy balancer.

Run: ``make bench-balance`` or ``.venv/bin/python bench/balance_sim.py --help``. Writes
``bench/results/balance_sim.json`` and a plot (``--plot``, default ``docs/img/balance_sim.png``).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time
from pathlib import Path
from typing import Any

from _balance_fleet import (
    LoadModel,
    SimClock,
    Strategy,
    ferry,
    fleet_imbalance,
    greedy,
    initial_placement,
    no_balancing,
)
from _common import table, write_results

from ferry_coordinator.balance import (
    AutomationPolicy,
    BalanceCycle,
    Balancer,
    BalanceRules,
    CapacityPlacement,
    RecommendationBook,
)

ROOT = Path(__file__).resolve().parent.parent


def simulate(args: argparse.Namespace) -> tuple[list[Strategy], BalanceRules, float]:
    rng = random.Random(args.seed)
    model = LoadModel.build(args.vms, rng)
    start = initial_placement(model, args.hosts, rng)
    clock = SimClock()
    rules = BalanceRules(interval_s=args.round_s)
    cycle = BalanceCycle(Balancer(CapacityPlacement(), rules, clock), AutomationPolicy("full"),
                         RecommendationBook(clock))
    strategies = [
        Strategy("none", dict(start), no_balancing),
        Strategy("greedy", dict(start), greedy(args.hosts)),
        Strategy("ferry", dict(start), ferry(cycle, args.hosts)),
    ]
    end = args.hours * 3600.0
    began = time.perf_counter()
    t = 0.0
    while t < end:
        clock.t = t
        for s in strategies:
            s.finish(t)
        if t % args.round_s == 0:
            model.step(args.round_s)
            for s in strategies:
                s.series.append(fleet_imbalance(s, model, args.hosts))
                t0 = time.perf_counter()
                moves = s.decide(s, model, t)
                s.decide_s.append(time.perf_counter() - t0)
                s.start(moves, model, t)
        t += args.tick_s
    return strategies, rules, time.perf_counter() - began


def summary(s: Strategy, rules: BalanceRules, hours: float) -> dict[str, Any]:
    under = sum(1 for x in s.series if x <= rules.threshold) / len(s.series)
    again = sum(
        1 for times in s.moved_at.values() for a, b in zip(times, times[1:], strict=False)
        if b - a < rules.cooldown_s
    )
    return {
        "fraction_under_threshold": round(under, 4),
        "migrations": s.migrations,
        "migrations_per_hour": round(s.migrations / hours, 2),
        "imbalance_median": round(statistics.median(s.series), 4),
        "imbalance_p95": round(sorted(s.series)[int(0.95 * (len(s.series) - 1))], 4),
        "moved_again_within_cooldown": again,
        "max_in_flight": s.max_in_flight,
        "decision_ms_median": round(statistics.median(s.decide_s) * 1000, 2),
        "decision_ms_p99": round(sorted(s.decide_s)[int(0.99 * (len(s.decide_s) - 1))] * 1000, 2),
    }


def plot(strategies: list[Strategy], rules: BalanceRules, round_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=110)
    styles = {"none": ("#999999", "no balancing"), "greedy": ("#d95f02", "naive greedy"),
              "ferry": ("#1b9e77", "Ferry")}
    for s in strategies:
        colour, label = styles[s.name]
        hours = [i * round_s / 3600.0 for i in range(len(s.series))]
        ax.plot(hours, s.series, color=colour, linewidth=1.1, label=f"{label} ({s.migrations} migrations)")
    ax.axhline(rules.threshold, color="black", linestyle="--", linewidth=0.9, label=f"threshold {rules.threshold}")
    ax.set_xlabel("simulated hours")
    ax.set_ylabel("imbalance (CV of host utilisation)")
    ax.set_ylim(0, max(max(s.series) for s in strategies) * 1.35)
    ax.legend(loc="upper right", fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=100)
    ap.add_argument("--vms", type=int, default=2000)
    ap.add_argument("--hours", type=float, default=24.0, help="simulated hours")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--round-s", type=float, default=60.0, help="simulated seconds per round")
    ap.add_argument("--tick-s", type=float, default=10.0, help="simulated seconds per tick (migrations end on a tick)")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "balance_sim.png")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args()

    strategies, rules, wall = simulate(args)
    results = {s.name: summary(s, rules, args.hours) for s in strategies}
    ferry_r, greedy_r = results["ferry"], results["greedy"]
    goal = ferry_r["fraction_under_threshold"] >= 0.95 and ferry_r["migrations"] < greedy_r["migrations"]
    print(table(
        [[name, f"{r['fraction_under_threshold']:.1%}", r["migrations"], r["migrations_per_hour"],
          r["imbalance_median"], r["imbalance_p95"], r["moved_again_within_cooldown"], r["max_in_flight"], r["decision_ms_median"]]
         for name, r in results.items()],
        ["strategy", "under threshold", "migrations", "per hour", "median", "p95", "moved again <1h", "max in flight", "decision ms"],
    ))
    print(f"goal (ferry >= 95 % under {rules.threshold}, fewer migrations than greedy): {'met' if goal else 'NOT met'}"
          f"  [{args.hosts} hosts, {args.vms} VMs, {args.hours:g} h, seed {args.seed}; {wall:.1f} s wall]")
    payload = {
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rules": dataclasses.asdict(rules),
        "results": results, "goal_met": goal, "wall_s": round(wall, 1),
        "series": {s.name: [round(x, 4) for x in s.series] for s in strategies},
    }
    path = write_results("balance_sim", payload)
    print(f"results: {path}")
    if not args.no_plot:
        plot(strategies, rules, args.round_s, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
