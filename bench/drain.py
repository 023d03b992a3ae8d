"""Drain efficiency: a host of 100 sim VMs drained under limits, against the floor the limits
allow.

Floor, same run: ceil(VMs / outbound limit) × one migration's time, that time measured first
(the median of a few single migrations of a VM the same size, between two other hosts). The
drain's wall time runs from the DrainRequest to the host being empty. Goal: within 1.1x.
Also reported: the slot ratio, the wall time against ceil(VMs / outbound) x the median of the
drain's own migrations (how busy the slots were kept, whatever slows migrations run together).

The drain's migrations are fleet-queue entries, started by the coordinator's dispatcher.

Run: ``make bench-drain`` or ``.venv/bin/python bench/drain.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import median, ratio, table, write_results  # noqa: E402

from ferry_cli.cluster import HostOptions  # noqa: E402
from ferry_common.bus.topology import COORDINATOR_QUERY, HOST_DRAIN_REQUEST  # noqa: E402
from ferry_common.messages.drains import DrainRequest, DrainStatusEvent, GetDrain  # noqa: E402
from ferry_coordinator.fleet.queue import Limits  # noqa: E402
from ferry_coordinator.timeouts import SagaTimeouts  # noqa: E402
from ferry_testing.harness import Cluster, make_cluster  # noqa: E402

HOSTS = ("host-a", "host-b", "host-c", "host-d", "host-e")
TIMEOUTS = SagaTimeouts(reply_s=30.0, attempts=2, status_poll_s=2.0, lease_s=60.0)


async def drain_status(c: Cluster) -> DrainStatusEvent:
    ans = await c.client.endpoint.request(COORDINATOR_QUERY, GetDrain(host="host-a"), timeout=30)
    assert isinstance(ans, DrainStatusEvent)
    return ans


async def run(args: argparse.Namespace) -> dict[str, Any]:
    opts = {h: HostOptions(inventory_interval_s=0.5, capacity_mib=1024 * 1024) for h in HOSTS}
    c = await make_cluster(args.bus, HOSTS, timeouts=TIMEOUTS, options=opts)
    try:
        limits = Limits(cluster=args.cluster, outbound_per_host=args.outbound, inbound_per_host=args.inbound)
        await c.store.queue.set_limits(limits)
        params = {"sim_bandwidth_mibps": args.mibps}
        # one migration's time, measured here: single migrations between two other hosts
        singles = []
        for i in range(args.singles):
            await c.create_vm("host-b", f"one{i}", memory_mib=args.memory, **params)
            t0 = time.perf_counter()
            outcome = await c.migrate(f"one{i}", "host-c", timeout=120)
            singles.append(time.perf_counter() - t0)
            assert outcome.status == "completed", outcome
        one = median(singles)
        for i in range(args.vms):
            await c.create_vm("host-a", f"vm{i:03d}", memory_mib=args.memory, **params)
        t0 = time.perf_counter()
        ans = await c.client.endpoint.request(HOST_DRAIN_REQUEST, DrainRequest(host="host-a"), timeout=30)
        assert isinstance(ans, DrainStatusEvent), ans
        while True:
            st = await drain_status(c)
            if st.status != "draining" and st.in_flight == 0:
                break
            await asyncio.sleep(0.05)
        wall = time.perf_counter() - t0
        assert st.status == "drained" and st.done == args.vms, st
        floor = math.ceil(args.vms / min(args.outbound, args.cluster)) * one
        # the drain's own migrations, as the store measured them: against them the ratio says
        # how well the slots were kept busy, apart from migrations slowing down when run together
        d = await c.store.drains.latest("host-a")
        in_drain = median(d.durations) if d is not None else float("nan")
        busy_floor = math.ceil(args.vms / min(args.outbound, args.cluster)) * in_drain
        return {"drain_migration_median_s": in_drain, "slot_ratio": ratio(wall, busy_floor), "vms": args.vms, "memory_mib": args.memory, "limits": limits.to_dict(), "one_migration_s": one,
                "singles_s": singles, "drain_wall_s": wall, "floor_s": floor, "ratio": ratio(wall, floor),
                "bus": args.bus}
    finally:
        await c.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vms", type=int, default=100)
    p.add_argument("--memory", type=int, default=256, help="MiB per VM")
    p.add_argument("--mibps", type=float, default=512.0, help="sim bandwidth: 256 MiB at 512 MiB/s is ~0.5 s")
    p.add_argument("--cluster", type=int, default=5)
    p.add_argument("--outbound", type=int, default=2)
    p.add_argument("--inbound", type=int, default=2)
    p.add_argument("--singles", type=int, default=5, help="single migrations timed for the floor")
    p.add_argument("--bus", choices=("memory", "rabbitmq"), default="rabbitmq")
    args = p.parse_args()
    result = asyncio.run(run(args))
    print(table([[result["vms"], f"{result['one_migration_s']:.3f}", f"{result['floor_s']:.2f}",
                  f"{result['drain_wall_s']:.2f}", f"{result['ratio']:.3f}",
                  f"{result['drain_migration_median_s']:.3f}", f"{result['slot_ratio']:.3f}"]],
                ["VMs", "one migration (s)", "floor (s)", "drain (s)", "ratio", "in-drain migration (s)",
                 "slot ratio"]))
    print(f"results: {write_results('drain', result)}")


if __name__ == "__main__":
    main()
