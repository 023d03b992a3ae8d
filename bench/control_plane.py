"""Control-plane throughput: many concurrent migrations, against the messaging floor.

N VMs (``sim`` driver, ``sim_instant``: the hypervisor part takes no time) are spread
over H hosts and all migrated at once, one wave per repetition (to the next host,
then back again, ...). A wave's rate is N / (time from the first ``MigrateRequest``
published to the last ``migration.completed`` received), end to end through the
broker. In the same run, on the same broker, the messaging floor:

* ``endpoint rpc``: a trivial request/reply (``HealthCheck`` -> ``Health``) through the
  same :class:`~ferry_common.endpoint.Endpoint` machinery as every saga step (durable
  quorum queue, persistent messages, publisher confirms, mandatory routing, tracing);
* ``raw aio-pika rpc``: the same round trip hand-written on aio-pika, with the same
  broker guarantees (quorum queue, persistent, confirms) and without them (classic
  transient queue, no confirms): the floor under the floor.

Each is measured one at a time (latency) and with many in flight (throughput). The
saga's cost is then a multiple of the floor: ``messages per migration x RTT`` for
one migration alone, and ``messages per migration / floor messages per second`` for
the concurrent rate.

``--host-process`` runs the hosts' services in a second process (``ferry up --no-coordinator``),
as a deployment runs services apart (results ``control_plane_hosts_apart.json``); only this
process's messages are counted then (the coordinator's requests, its statuses and the
client's requests), and the floor rate is the one for those: what the coordinator, the busier
process, can carry. Neither setup's client watches every status (one that follows
migrations runs elsewhere); the waves follow the outcomes.

Run: ``make bench-control`` or ``.venv/bin/python bench/control_plane.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from ferry_coordinator.fleet.queue import Limits

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    HOST_PROCESS,
    ONE_PROCESS,
    BenchCluster,
    amqp_url,
    echo_pair,
    median,
    pct,
    ratio,
    round_trips_ms,
    start_cluster,
    table,
    wait_for,
    write_results,
)

from ferry_common.bus.interfaces import QueueSpec  # noqa: E402
from ferry_common.bus.topology import MIGRATION_REQUESTED, MIGRATION_STATUSES, migration_status  # noqa: E402
from ferry_common.endpoint import Context, Router  # noqa: E402
from ferry_common.ids import new_id  # noqa: E402
from ferry_common.messages.public import MigrateRequest, MigrationStatusEvent  # noqa: E402
from ferry_testing.sample import MODULES, graph, vm_spec  # noqa: E402

TERMINAL = ("completed", "rolled_back", "rejected")


# ---- following outcomes ---------------------------------------------------------------------
@dataclass
class Outcomes:
    """Terminal status events by migration id, with the time they arrived."""

    seen: dict[str, tuple[str, float]] = field(default_factory=dict)
    waiting: dict[str, asyncio.Future[None]] = field(default_factory=dict)
    want: set[str] = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def expect(self, mids: set[str]) -> None:
        self.want = set(mids)
        self.done.clear()

    def record(self, msg: MigrationStatusEvent) -> None:
        if msg.status in TERMINAL and msg.migration_id not in self.seen:
            self.seen[msg.migration_id] = (msg.status, time.perf_counter())
            self.want.discard(msg.migration_id)
            if not self.want:
                self.done.set()


async def follow_outcomes(cluster: BenchCluster) -> Outcomes:
    """A consumer of the terminal ``migration.<status>`` keys on the client's connection."""
    out = Outcomes()
    router = Router()
    router.route_key(MIGRATION_STATUSES, MigrationStatusEvent)

    async def on_status(msg: MigrationStatusEvent, ctx: Context) -> None:
        out.record(msg)

    router.add(MigrationStatusEvent, on_status)
    ep = cluster.client.endpoint
    spec = QueueSpec(f"outcomes.{ep.instance}", tuple(migration_status(s) for s in TERMINAL), durable=False, prefetch=1024)
    await ep.serve(spec, router)
    return out


# ---- the migrations ------------------------------------------------------------------------
async def create_vms(cluster: BenchCluster, n: int, hosts: list[str]) -> dict[str, str]:
    """``n`` instant-migrating VMs, round robin over ``hosts``; returns vm -> host."""
    home = {f"vm-{i:05d}": hosts[i % len(hosts)] for i in range(n)}
    sem = asyncio.Semaphore(32)

    async def one(vm_id: str, host: str) -> None:
        async with sem:
            await cluster.client.create_vm(host, vm_spec(vm_id, memory_mib=64, sim_instant=True), graph(vm_id), MODULES)

    await asyncio.gather(*(one(v, h) for v, h in home.items()))

    def placed() -> bool:
        return all((loc := cluster.coordinator.hosts.locate(v)) is not None and loc[0] == h for v, h in home.items())

    for h in cluster.hosts.values():
        await h.adapter.publish_inventory()
    await wait_for(placed, 60.0, "the coordinator to see every VM")
    return home


async def wave(cluster: BenchCluster, outcomes: Outcomes, moves: dict[str, str], timeout: float) -> dict[str, Any]:
    """Migrate every VM of ``moves`` (vm -> target) at once; wait for every outcome."""
    mids = {vm: new_id() for vm in moves}
    outcomes.expect(set(mids.values()))
    cluster.reset_counts()
    ep = cluster.client.endpoint
    sent: dict[str, float] = {}
    t0 = time.perf_counter()
    for vm, target in moves.items():
        sent[mids[vm]] = time.perf_counter()
        await ep.send(MIGRATION_REQUESTED, MigrateRequest(vm_id=vm, target_host=target, migration_id=mids[vm]))
    published_at = time.perf_counter()
    try:
        await asyncio.wait_for(outcomes.done.wait(), timeout)
    except TimeoutError:
        raise SystemExit(f"wave did not finish in {timeout:g}s: {len(outcomes.want)} outcomes missing") from None
    t1 = max(outcomes.seen[m][1] for m in mids.values())
    statuses = [outcomes.seen[m][0] for m in mids.values()]
    bad = [s for s in statuses if s != "completed"]
    if bad:
        raise SystemExit(f"{len(bad)} migrations did not complete: {sorted(set(bad))}")
    await wait_for(lambda: not cluster.coordinator.running, 30.0, "sagas to wind down")
    latencies = [(outcomes.seen[m][1] - sent[m]) * 1000 for m in mids.values()]
    n = len(moves)
    types = cluster.by_type()
    return {
        "migrations": n,
        "seconds": t1 - t0,
        "rate": n / (t1 - t0),
        "publish_s": published_at - t0,
        "latency_ms_median": median(latencies),
        "latency_ms_p95": pct(latencies, 95),
        "messages_per_migration": cluster.published / n,
        "amqp_messages_per_migration": cluster.amqp_published / n,
        "messages_by_type_per_migration": {k: round(v / n, 2) for k, v in sorted(types.items(), key=lambda kv: -kv[1])},
    }


async def one_alone(cluster: BenchCluster, outcomes: Outcomes, vm: str, target: str) -> float:
    """Seconds for one migration with nothing else running (its latency floor is steps x RTT)."""
    mid = new_id()
    outcomes.expect({mid})
    t0 = time.perf_counter()
    await cluster.client.endpoint.send(MIGRATION_REQUESTED, MigrateRequest(vm_id=vm, target_host=target, migration_id=mid))
    await asyncio.wait_for(outcomes.done.wait(), 30)
    await wait_for(lambda: not cluster.coordinator.running, 30.0, "the saga to wind down")
    return outcomes.seen[mid][1] - t0


# ---- the messaging floor ----------------------------------------------------------------------
async def endpoint_rpc(cluster: BenchCluster, sequential: int, concurrent: int, inflight: int) -> dict[str, float]:
    """Request/reply through two Endpoints, exactly as a saga step goes (durable queue, confirms)."""
    async with echo_pair(await cluster.new_bus(), await cluster.new_bus()) as call:
        rtts = await round_trips_ms(call, sequential, warmup=50)
        sem = asyncio.Semaphore(inflight)

        async def one() -> None:
            async with sem:
                await call(60)

        t = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(concurrent)))
        rate = concurrent / (time.perf_counter() - t)
    return {"rtt_ms": median(rtts), "rtt_ms_p95": pct(rtts, 95), "rpc_per_s": rate}


async def raw_rpc(url: str, sequential: int, concurrent: int, inflight: int, *, durable: bool) -> dict[str, float]:
    """The same round trip written directly on aio-pika.

    ``durable``: quorum queue, persistent messages, publisher confirms (Ferry's guarantees);
    otherwise a classic transient queue without confirms (the cheapest RPC RabbitMQ does).
    """
    conn = await aio_pika.connect_robust(url)
    sconn = await aio_pika.connect_robust(url)
    try:
        sch = await sconn.channel(publisher_confirms=durable)
        await sch.set_qos(prefetch_count=256)
        name = f"bench.raw.{uuid.uuid4().hex[:6]}"
        args = {"x-queue-type": "quorum"} if durable else None
        queue = await sch.declare_queue(name, durable=durable, auto_delete=not durable, arguments=args)
        mode = aio_pika.DeliveryMode.PERSISTENT if durable else aio_pika.DeliveryMode.NOT_PERSISTENT

        async def serve(m: AbstractIncomingMessage) -> None:
            reply = aio_pika.Message(b'{"service":"echo"}', correlation_id=m.correlation_id, delivery_mode=mode)
            await sch.default_exchange.publish(reply, routing_key=m.reply_to or "")
            await m.ack()

        await queue.consume(serve)
        ch = await conn.channel(publisher_confirms=durable)
        replies = await ch.declare_queue(exclusive=True, auto_delete=True)
        pending: dict[str, asyncio.Future[None]] = {}

        async def on_reply(m: AbstractIncomingMessage) -> None:
            fut = pending.pop(m.correlation_id or "", None)
            if fut is not None and not fut.done():
                fut.set_result(None)

        await replies.consume(on_reply, no_ack=True)
        loop = asyncio.get_running_loop()

        async def call() -> None:
            cid = uuid.uuid4().hex
            fut: asyncio.Future[None] = loop.create_future()
            pending[cid] = fut
            msg = aio_pika.Message(b"{}", correlation_id=cid, reply_to=replies.name, delivery_mode=mode)
            await ch.default_exchange.publish(msg, routing_key=name)
            await asyncio.wait_for(fut, 60)

        for _ in range(50):
            await call()
        rtts = []
        for _ in range(sequential):
            t = time.perf_counter()
            await call()
            rtts.append((time.perf_counter() - t) * 1000)
        sem = asyncio.Semaphore(inflight)

        async def bounded() -> None:
            async with sem:
                await call()

        t = time.perf_counter()
        await asyncio.gather(*(bounded() for _ in range(concurrent)))
        rate = concurrent / (time.perf_counter() - t)
    finally:  # the queues go with the vhost
        await conn.close()
        await sconn.close()
    return {"rtt_ms": median(rtts), "rtt_ms_p95": pct(rtts, 95), "rpc_per_s": rate}


# ---- the run ------------------------------------------------------------------------------------
async def run(args: argparse.Namespace) -> dict[str, Any]:
    hosts = [f"host-{chr(ord('a') + i)}" for i in range(args.hosts)]
    cluster = await start_cluster(args.bus, hosts, host_process=args.host_process)
    try:
        # every request goes through the fleet queue; this measures concurrency, so the limits
        # let every VM of a wave move at once (the queue and its claims stay in the path)
        n = max(args.vms, 1)
        await cluster.coordinator.store.queue.set_limits(Limits(cluster=n, outbound_per_host=n, inbound_per_host=n))
        outcomes = await follow_outcomes(cluster)
        t = time.perf_counter()
        home = await create_vms(cluster, args.vms, hosts)
        print(f"created {args.vms} VMs on {len(hosts)} hosts in {time.perf_counter() - t:.1f}s ({args.bus})", flush=True)
        where = dict(home)
        # one migration alone first: the sequential latency to compare with steps x RTT
        alone = []
        probe = next(iter(where))
        for _ in range(args.alone):
            tgt = hosts[(hosts.index(where[probe]) + 1) % len(hosts)]
            alone.append(await one_alone(cluster, outcomes, probe, tgt))
            where[probe] = tgt
        waves = []
        for rep in range(args.warmup + args.reps):
            moves = {v: hosts[(hosts.index(h) + 1) % len(hosts)] if rep % 2 == 0 else home[v] for v, h in where.items()}
            if rep % 2 == 1:
                moves = {v: (home[v] if where[v] != home[v] else hosts[(hosts.index(home[v]) + 1) % len(hosts)]) for v in where}
            w = await wave(cluster, outcomes, moves, args.timeout)
            where.update(moves)
            tag = "warm-up" if rep < args.warmup else f"rep {rep - args.warmup + 1}"
            print(f"  wave {tag}: {w['migrations']} migrations in {w['seconds']:.2f}s = {w['rate']:.1f}/s, "
                  f"latency median {w['latency_ms_median']:.0f} ms, {w['messages_per_migration']:.1f} messages each "
                  f"in {w['amqp_messages_per_migration']:.1f} AMQP messages", flush=True)
            if rep >= args.warmup:
                waves.append(w)
        floor: dict[str, dict[str, float]] = {}
        floor["endpoint rpc"] = await endpoint_rpc(cluster, args.rtt_samples, args.rtt_concurrent, args.inflight)
        if args.bus == "rabbitmq" and cluster.vhost:
            url = amqp_url(cluster.vhost)
            floor["raw aio-pika rpc (quorum, confirms)"] = await raw_rpc(
                url, args.rtt_samples, args.rtt_concurrent, args.inflight, durable=True)
            floor["raw aio-pika rpc (transient, no confirms)"] = await raw_rpc(
                url, args.rtt_samples, args.rtt_concurrent, args.inflight, durable=False)
    finally:
        await cluster.close()
    return {"waves": waves, "alone_s": alone, "floor": floor}


def report(args: argparse.Namespace, res: dict[str, Any]) -> dict[str, Any]:
    waves = res["waves"]
    rate = median([w["rate"] for w in waves])
    msgs = median([w["messages_per_migration"] for w in waves])
    lat = median([w["latency_ms_median"] for w in waves])
    alone_ms = median(res["alone_s"]) * 1000
    by_type = waves[len(waves) // 2]["messages_by_type_per_migration"]
    whole = not args.host_process
    sent = sum(v for k, v in by_type.items() if k not in ("MigrationStatusEvent", "HostInventory", "VmMigrationFinished",
                                                           "MigrateRequest"))
    # in one process requests and replies are both counted here; with the hosts apart, only
    # the coordinator's requests are (the replies and forwards are the other process's)
    requests = sent / 2 if whole else sent
    ep = res["floor"]["endpoint rpc"]
    # a message costs half an RPC. With the hosts apart this is the floor for the messages of
    # this process (coordinator and client), the busier one: what the coordinator can carry
    floor_rate = 2 * ep["rpc_per_s"] / msgs
    print()
    print(f"control plane, {args.bus}: {args.vms} VMs on {args.hosts} hosts, sim driver (instant), "
          f"{args.reps} waves (median), {HOST_PROCESS if args.host_process else ONE_PROCESS}")
    rows = [
        ["migrations per second (all at once)", rate, f"target >= {args.target:g}: {'MET' if rate >= args.target else 'MISSED'}"],
        ["  per wave", ", ".join(f"{w['rate']:.1f}" for w in waves), ""],
        ["migration latency under load, median ms", lat, ""],
        ["one migration alone, ms", alone_ms, f"{len(res['alone_s'])} runs"],
        ["messages per migration", msgs, f"~{requests:.0f} request/reply pairs + events"
         + ("" if whole else ", this process only (coordinator and client)")],
        ["  in AMQP messages", median([w["amqp_messages_per_migration"] for w in waves]),
         "host commands and replies to one key coalesced under load"],
    ]
    print(table(rows, ["measure", "median", "note"]))
    print()
    frows = []
    for name, f in res["floor"].items():
        frows.append([name, f["rtt_ms"], f["rpc_per_s"], ratio(alone_ms, requests * f["rtt_ms"]),
                      ratio(2 * f["rpc_per_s"] / msgs, rate)])
    print(table(frows, ["messaging floor", "RTT ms", "rpc/s (inflight)", "alone / (reqs x RTT)", "floor rate / saga rate"]))
    print(f"\nfloor rate = 2 x rpc/s / messages per migration = {floor_rate:.0f} migrations/s through the Endpoint machinery"
          + ("" if whole else ", for this process's messages"))
    print("\nmessages per migration by type:")
    print(table([[k, v] for k, v in by_type.items()], ["type", "per migration"]))
    return {
        "bus": args.bus,
        "setup": HOST_PROCESS if args.host_process else ONE_PROCESS,
        "vms": args.vms,
        "hosts": args.hosts,
        "reps": args.reps,
        "migrations_per_s_median": rate,
        "target_migrations_per_s": args.target,
        "target_met": rate >= args.target,
        "latency_ms_median": lat,
        "one_alone_ms_median": alone_ms,
        "messages_per_migration": msgs,
        "request_reply_pairs_per_migration": requests,
        "floor": res["floor"],
        "amqp_messages_per_migration": median([w["amqp_messages_per_migration"] for w in waves]),
        "floor_migrations_per_s": floor_rate,
        "floor_counts": "every message" if whole else "this process's messages (coordinator and client)",
        "saga_vs_floor_rate": ratio(floor_rate, rate),
        "alone_vs_steps_x_rtt": ratio(alone_ms, requests * ep["rtt_ms"]),
        "waves": waves,
        "alone_s": res["alone_s"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bus", choices=("rabbitmq", "memory"), default="rabbitmq")
    p.add_argument("--vms", type=int, default=400)
    p.add_argument("--hosts", type=int, default=4)
    p.add_argument("--reps", type=int, default=5, help="measured waves (the median is reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--alone", type=int, default=5, help="single migrations with nothing else running")
    p.add_argument("--rtt-samples", type=int, default=500)
    p.add_argument("--rtt-concurrent", type=int, default=5000)
    p.add_argument("--inflight", type=int, default=256)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--target", type=float, default=100.0)
    p.add_argument("--host-process", action="store_true",
                   help="run the hosts' services in a second process (RabbitMQ only)")
    p.add_argument("--name", default=None, help="results file name (default control_plane[_memory])")
    args = p.parse_args()
    res = asyncio.run(run(args))
    out = report(args, res)
    default = ("control_plane" if args.bus == "rabbitmq" else "control_plane_memory") + ("_hosts_apart" if args.host_process else "")
    path = write_results(args.name or default, out)
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
