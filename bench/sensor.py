"""Sensor intake and dispatch: events per second one host takes in and acts on.

N events are published to ``vm.<id>.event`` for V VMs of one host (round robin, a
window of publishes in flight). The clock runs from the first publish until the
managed-object ledger of the host holds every event: each was taken in by the
sensor, ordered, batched into ``DispatchEvents``, sent to the managed-object service
and run through the VM's embots (the sample graph's CEL policies). The sensor's own
share (until it has forwarded everything) is reported too.

Baseline, same bus, same run: the raw publish+consume rate with a no-op handler
(``Bus.publish`` / ``Bus.consume``, ack only), and the same through an
:class:`~ferry_common.endpoint.Endpoint` (decode, validate, trace, ack).

Run: ``make bench-sensor`` or ``.venv/bin/python bench/sensor.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    ONE_PROCESS,
    BenchCluster,
    drop_queue,
    median,
    ratio,
    start_cluster,
    table,
    wait_for,
    write_results,
)

from ferry_common.bus.interfaces import Delivery, Message, QueueSpec  # noqa: E402
from ferry_common.bus.topology import vm_events  # noqa: E402
from ferry_common.endpoint import Context, Endpoint, Router  # noqa: E402
from ferry_common.messages import encode  # noqa: E402
from ferry_common.messages.base import Wire  # noqa: E402
from ferry_common.messages.public import VmEvent, VmEventBatch  # noqa: E402
from ferry_testing.sample import MODULES, event, graph, vm_spec  # noqa: E402

HOST = "host-a"


def events(vms: list[str], n: int, offset: int) -> list[VmEvent]:
    """``n`` events of the sample stream, round robin over ``vms``."""
    out = []
    for i in range(offset, offset + n):
        vm = vms[i % len(vms)]
        ev = event(vm, i, 1_000_000.0 + i)
        out.append(VmEvent.model_validate(ev.model_dump()))
    return out


def messages(evs: list[VmEvent], batch: int) -> list[Wire]:
    """One message per event (``batch`` 1), or per VM ``VmEventBatch`` messages of ``batch`` events
    (a collector's flush: consecutive events of the stream, grouped by VM)."""
    if batch <= 1:
        return list(evs)
    out: list[Wire] = []
    pending: dict[str, list[VmEvent]] = {}
    for ev in evs:
        group = pending.setdefault(ev.vm_id, [])
        group.append(ev)
        if len(group) == batch:
            out.append(VmEventBatch(vm_id=ev.vm_id, events=list(group)))
            group.clear()
    out.extend(VmEventBatch(vm_id=v, events=g) for v, g in pending.items() if g)
    return out


async def publish_all(ep: Endpoint, msgs: list[Wire], window: int) -> None:
    """Publish in order, with up to ``window`` publishes awaiting their confirm."""
    sem = asyncio.Semaphore(window)
    tasks = []

    async def one(m: Wire) -> None:
        try:
            await ep.send(vm_events(m.vm_id), m)  # type: ignore[attr-defined]
        finally:
            sem.release()

    for m in msgs:
        await sem.acquire()
        tasks.append(asyncio.ensure_future(one(m)))
    await asyncio.gather(*tasks)


async def sensor_run(
    cluster: BenchCluster, vms: list[str], n: int, offset: int, window: int, batch: int = 1
) -> dict[str, float]:
    host = cluster.hosts[HOST]
    msgs = messages(events(vms, n, offset), batch)
    ledger0 = sum(host.managed_object.dispatched_count(v) for v in vms)
    sent0 = host.sensor.dispatched
    ep = cluster.client.endpoint
    taken: list[float] = []

    def ledger_done() -> bool:
        if not taken and host.sensor.dispatched - sent0 >= n:
            taken.append(time.perf_counter())
        return sum(host.managed_object.dispatched_count(v) for v in vms) - ledger0 >= n

    t0 = time.perf_counter()
    await publish_all(ep, msgs, window)
    published = time.perf_counter()
    await wait_for(ledger_done, 600.0, "the ledger to hold every event", poll=0.002)
    t1 = time.perf_counter()
    return {
        "events": n,
        "seconds": t1 - t0,
        "rate": n / (t1 - t0),
        "publish_rate": n / (published - t0),
        "sensor_forward_rate": n / ((taken[0] if taken else t1) - t0),
    }


async def windowed_rate(n: int, window: int, send: Callable[[], Awaitable[Any]], done: asyncio.Event) -> float:
    """Messages per second: ``n`` sends, at most ``window`` in flight, until ``done`` (every
    one handled) is set."""
    sem = asyncio.Semaphore(window)

    async def one() -> None:
        try:
            await send()
        finally:
            sem.release()

    t0 = time.perf_counter()
    tasks = []
    for _ in range(n):
        await sem.acquire()
        tasks.append(asyncio.ensure_future(one()))
    await asyncio.gather(*tasks)
    await asyncio.wait_for(done.wait(), 600)
    return n / (time.perf_counter() - t0)


async def noop_bus(cluster: BenchCluster, n: int, window: int, body: bytes) -> float:
    """Raw bus: publish ``n`` messages, consume them with a handler that only acks."""
    pub, sub = await cluster.new_bus(), await cluster.new_bus()
    got = 0
    done = asyncio.Event()

    async def handler(d: Delivery) -> None:
        nonlocal got
        await d.ack()
        got += 1
        if got >= n:
            done.set()

    # a key of its own per run: an earlier run's queue (left in the vhost) must not get copies
    key = f"bench.noop.{time.monotonic_ns()}"
    consumer = await sub.consume(QueueSpec(key, (key,), durable=True, prefetch=256), handler)
    rate = await windowed_rate(
        n, window, lambda: pub.publish(Message(routing_key=key, body=body, type="VmEvent")), done
    )
    await consumer.cancel()
    drop_queue(cluster.vhost, key)
    return rate


async def noop_endpoint(cluster: BenchCluster, n: int, window: int, sample: VmEvent) -> float:
    """The same through Endpoints: signed/traced send, decode and validate, a no-op handler."""
    server = Endpoint(await cluster.new_bus(), "bench/noop")
    client = Endpoint(await cluster.new_bus(), "bench/noop-client")
    got = 0
    done = asyncio.Event()
    router = Router()
    key = f"bench.noop-ep.{time.monotonic_ns()}"
    router.route_key(key, VmEvent)

    async def handler(msg: VmEvent, ctx: Context) -> None:
        nonlocal got
        got += 1
        if got >= n:
            done.set()

    router.add(VmEvent, handler)
    await server.serve(QueueSpec(key, (key,), durable=True, prefetch=256), router)
    rate = await windowed_rate(n, window, lambda: client.send(key, sample), done)
    await server.close()
    await client.close()
    drop_queue(cluster.vhost, key)
    return rate


async def run(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    cluster = await start_cluster(kind, [HOST])
    try:
        vms = [f"vm-{i:03d}" for i in range(args.vms)]
        for v in vms:
            await cluster.client.create_vm(HOST, vm_spec(v, memory_mib=64), graph(v), MODULES)
        sample = events(vms, 1, 0)[0]
        offset = 0
        warm = await sensor_run(cluster, vms, min(2000, args.events), offset, args.window)
        offset += min(2000, args.events)
        print(f"  {kind}: warm-up {warm['rate']:.0f} events/s", flush=True)
        runs, batched, bus_rates, ep_rates = [], [], [], []
        for rep in range(args.reps):
            r = await sensor_run(cluster, vms, args.events, offset, args.window)
            offset += args.events
            rb = await sensor_run(cluster, vms, args.events, offset, args.window, args.batch)
            offset += args.events
            b = await noop_bus(cluster, args.events, args.window, encode(sample))
            e = await noop_endpoint(cluster, args.events, args.window, sample)
            runs.append(r)
            batched.append(rb)
            bus_rates.append(b)
            ep_rates.append(e)
            print(f"  {kind} rep {rep + 1}: sensor->ledger {r['rate']:.0f}/s one per message, "
                  f"{rb['rate']:.0f}/s in batches of {args.batch} "
                  f"(sensor forwarded at {r['sensor_forward_rate']:.0f}/s, {rb['sensor_forward_rate']:.0f}/s), "
                  f"no-op bus {b:.0f}/s, no-op endpoint {e:.0f}/s", flush=True)
    finally:
        await cluster.close()
    return {
        "bus": kind,
        "events_per_rep": args.events,
        "vms": args.vms,
        "rate_median": median([r["rate"] for r in runs]),
        "batch": args.batch,
        "batched_rate_median": median([r["rate"] for r in batched]),
        "batched_sensor_forward_rate_median": median([r["sensor_forward_rate"] for r in batched]),
        "batched_runs": batched,
        "sensor_forward_rate_median": median([r["sensor_forward_rate"] for r in runs]),
        "publish_rate_median": median([r["publish_rate"] for r in runs]),
        "noop_bus_rate_median": median(bus_rates),
        "noop_endpoint_rate_median": median(ep_rates),
        "runs": runs,
        "noop_bus_rates": bus_rates,
        "noop_endpoint_rates": ep_rates,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bus", choices=("memory", "rabbitmq", "both"), default="both")
    p.add_argument("--events", type=int, default=20_000, help="events per repetition")
    p.add_argument("--vms", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--window", type=int, default=512, help="publishes in flight")
    p.add_argument("--batch", type=int, default=100, help="events per VmEventBatch in the batched runs")
    p.add_argument("--target", type=float, default=10_000.0)
    args = p.parse_args()
    kinds = ("memory", "rabbitmq") if args.bus == "both" else (args.bus,)
    results = {k: asyncio.run(run(args, k)) for k in kinds}
    print(f"\nsensor intake and dispatch, one host, {args.vms} VMs, sample graph and policies, "
          f"{args.events} events per rep, {args.reps} reps (medians); {ONE_PROCESS}")
    rows = []
    for k, r in results.items():
        for label, rate, fwd in (("1", r["rate_median"], r["sensor_forward_rate_median"]),
                                 (str(args.batch), r["batched_rate_median"], r["batched_sensor_forward_rate_median"])):
            rows.append([k, label, rate, fwd, r["noop_bus_rate_median"], r["noop_endpoint_rate_median"],
                         ratio(rate, r["noop_bus_rate_median"]), "MET" if rate >= args.target else "MISSED"])
    print(table(rows, ["bus", "events/msg", "ledger ev/s", "sensor fwd ev/s", "no-op bus msg/s",
                       "no-op endpoint msg/s", "ledger / no-op bus", f">= {args.target:g}/s"]))
    for r in results.values():
        r["target_events_per_s"] = args.target
        r["target_met_one_per_message"] = r["rate_median"] >= args.target
        r["target_met_batched"] = r["batched_rate_median"] >= args.target
    path = write_results("sensor", {"setup": ONE_PROCESS, "results": results})
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
