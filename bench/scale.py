"""Management-plane time at scale: a VM with many elements and a long event backlog.

One VM (``sim`` driver, ``sim_instant``) with E managed elements (one embot per 50
elements, the sample policies) migrates from host-a to host-b while Q events are
queued on the source's sensor. How the backlog is made: the benchmark sends the
saga's own step-2 command (``FreezeEvents``, with the migration id it will then
request) to the source sensor, publishes the Q events (they queue, as they would while
a slow VM migration runs), waits until the sensor holds all Q, and then publishes
the ``MigrateRequest`` with that id: the saga's step 2 (run after the VM migration) is an
idempotent replay, and
steps 3 (graph), 4 (the Q events move to the target) and 7 (the target dispatches
them) carry the load.

Measured: *management-plane time* = saga start to completed minus the VM migration
step (``migrate_vm``), from the saga's own record (``history`` timestamps and
``data["timings_ms"]``), so it includes the saves and status events between steps.
Reported separately: the drain, i.e. until the target's ledger holds all Q events
(the embots acting on the backlog after the saga completed). Both modules are
installed on both hosts beforehand (no module fetch round).

Sizes: every combination of E in {1k, 10k} and Q in {10k, 100k}; the growth factor
from the smallest to the largest size (10x elements and 10x events) shows whether the
cost grows linearly (a factor of about 10) or worse.

Run: ``make bench-scale`` or ``.venv/bin/python bench/scale.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    ONE_PROCESS,
    BenchCluster,
    median,
    ratio,
    start_cluster,
    table,
    wait_for,
    write_results,
)

from ferry_cli.sample import CORE, LOAD, MODULES, TRACK_LAST, event, vm_spec  # noqa: E402
from ferry_common.bus.topology import MIGRATION_REQUESTED, host_command  # noqa: E402
from ferry_common.ids import new_id  # noqa: E402
from ferry_common.messages.commands import EventsFrozen, FreezeEvents, InstallModules  # noqa: E402
from ferry_common.messages.domain import Element, Embot, ManagementGraph  # noqa: E402
from ferry_common.messages.public import MAX_BATCH, MigrateRequest, VmEvent, VmEventBatch  # noqa: E402
from ferry_coordinator.store import SagaRecord  # noqa: E402

SOURCE, TARGET = "host-a", "host-b"
EMBOT_SPAN = 50


def big_graph(vm_id: str, elements: int) -> ManagementGraph:
    """The VM element and ``elements - 1`` dependents; one embot (TRACK_LAST) per 50 of them."""
    core, load = CORE.ref().key, LOAD.ref().key
    els = [Element(id=vm_id, vm_id=vm_id, type="vm", module=core, attributes={"state": "running"})]
    for i in range(elements - 1):
        els.append(Element(id=f"{vm_id}.m{i}", vm_id=vm_id, type="service", module=core, depends_on=[vm_id],
                           attributes={"name": f"svc-{i}", "port": 8000 + i % 1000}))
    ids = [e.id for e in els[1:]]
    embots = [
        Embot(id=f"{vm_id}.b{j}", module=load, elements=ids[j: j + EMBOT_SPAN], policies=[TRACK_LAST])
        for j in range(0, len(ids), EMBOT_SPAN)
    ]
    return ManagementGraph(vm_id=vm_id, elements=els, embots=embots, manifest=[CORE.ref(), LOAD.ref()])


def backlog(vm_id: str, elements: int, n: int) -> list[VmEvent]:
    """``n`` events of the sample stream, spread over the VM's dependents."""
    out = []
    for i in range(n):
        ev = event(vm_id, i, 1_000_000.0 + i, element=f"{vm_id}.m{i % (elements - 1)}")
        out.append(VmEvent.model_validate(ev.model_dump()))
    return out


async def publish_all(cluster: BenchCluster, evs: list[VmEvent], window: int) -> None:
    """Queue ``evs`` at the source (setup, not timed): in ``VmEventBatch`` messages of up to
    ``MAX_BATCH`` events, in order, ``window`` in flight; the sensor queues them as it would
    the same events one by one."""
    ep = cluster.client.endpoint
    sem = asyncio.Semaphore(window)
    tasks = []

    async def one(batch: VmEventBatch) -> None:
        try:
            await ep.send(f"vm.{batch.vm_id}.event", batch)
        finally:
            sem.release()

    for i in range(0, len(evs), MAX_BATCH):
        await sem.acquire()
        tasks.append(asyncio.ensure_future(one(VmEventBatch(vm_id=evs[i].vm_id, events=list(evs[i : i + MAX_BATCH])))))
    await asyncio.gather(*tasks)


async def one_run(cluster: BenchCluster, vm_id: str, elements: int, events: int, window: int) -> dict[str, Any]:
    client = cluster.client
    src, dst = cluster.hosts[SOURCE], cluster.hosts[TARGET]
    t = time.perf_counter()
    await client.create_vm(SOURCE, vm_spec(vm_id, memory_mib=64, sim_instant=True), big_graph(vm_id, elements), MODULES)
    await wait_for(lambda: (loc := cluster.coordinator.hosts.locate(vm_id)) is not None and loc[0] == SOURCE, 60.0,
                   "the coordinator to see the VM")
    created_s = time.perf_counter() - t
    mid = new_id()
    frozen = await client.endpoint.request(host_command(SOURCE, "sensor"), FreezeEvents(migration_id=mid, vm_id=vm_id), timeout=60)
    assert isinstance(frozen, EventsFrozen)
    t = time.perf_counter()
    await publish_all(cluster, backlog(vm_id, elements, events), window)
    await wait_for(lambda: src.sensor.vms[vm_id].queued >= events, 600.0, "the backlog to queue", poll=0.01)
    queued_s = time.perf_counter() - t
    t0 = time.perf_counter()
    await client.endpoint.send(MIGRATION_REQUESTED, MigrateRequest(vm_id=vm_id, target_host=TARGET, migration_id=mid))

    def finished() -> SagaRecord | None:
        return next((r for r in cluster.coordinator.finished if r.migration_id == mid), None)

    await wait_for(lambda: finished() is not None, 600.0, "the migration to end", poll=0.002)
    t1 = time.perf_counter()
    rec = finished()
    assert rec is not None
    if rec.status != "completed":
        raise SystemExit(f"migration {mid} ended {rec.status}: {rec.data.get('reason')}")
    await wait_for(lambda: dst.managed_object.dispatched_count(vm_id) >= events, 1200.0, "the backlog to be dispatched",
                   poll=0.01)
    t2 = time.perf_counter()
    timings: dict[str, float] = dict(rec.data["timings_ms"])
    started = next(h.at for h in rec.history if h.event == "started")
    wall_ms = (rec.history[-1].at - started) * 1000
    vm_ms = timings.get("migrate_vm", 0.0)
    return {
        "elements": elements,
        "events": events,
        "management_plane_ms": wall_ms - vm_ms,
        "steps_sum_ms": sum(v for k, v in timings.items() if k != "migrate_vm"),
        "saga_wall_ms": wall_ms,
        "vm_migration_ms": vm_ms,
        "request_to_finished_ms": (t1 - t0) * 1000,
        "drain_after_completed_s": t2 - t1,
        "timings_ms": timings,
        "events_moved": rec.data.get("events_moved"),
        "events_dispatched_on_target": rec.data.get("events_dispatched_on_target"),
        "create_s": created_s,
        "queue_s": queued_s,
    }


async def run(kind: str, sizes: list[tuple[int, int]], reps: int, window: int) -> list[dict[str, Any]]:
    cluster = await start_cluster(kind, [SOURCE, TARGET])
    out: list[dict[str, Any]] = []
    try:
        for h in (SOURCE, TARGET):
            await cluster.client.endpoint.request(host_command(h, "managed_object"), InstallModules(modules=MODULES), timeout=60)
        await one_run(cluster, "warmup", 200, 1000, window)
        n = 0
        for elements, events in sizes:
            for rep in range(reps):
                n += 1
                r = await one_run(cluster, f"big-{n}", elements, events, window)
                print(f"  {kind}: {elements} elements, {events} events, rep {rep + 1}: management plane "
                      f"{r['management_plane_ms']:.0f} ms (steps {r['steps_sum_ms']:.0f} ms, VM {r['vm_migration_ms']:.1f} ms), "
                      f"drain {r['drain_after_completed_s']:.1f}s", flush=True)
                out.append(r)
    finally:
        await cluster.close()
    return out


def summarize(kind: str, runs: list[dict[str, Any]], sizes: list[tuple[int, int]], target_ms: float) -> dict[str, Any]:
    rows, per_size = [], {}
    for e, q in sizes:
        rs = [r for r in runs if r["elements"] == e and r["events"] == q]
        steps = {s: median([r["timings_ms"].get(s, 0.0) for r in rs]) for s in rs[0]["timings_ms"]}
        m = {
            "management_plane_ms": median([r["management_plane_ms"] for r in rs]),
            "steps_sum_ms": median([r["steps_sum_ms"] for r in rs]),
            "drain_s": median([r["drain_after_completed_s"] for r in rs]),
            "steps_ms": steps,
        }
        per_size[f"{e}x{q}"] = m
        rows.append([kind, e, q, m["management_plane_ms"], steps.get("management_state", 0.0), steps.get("event_state", 0.0),
                     steps.get("complete", 0.0), m["drain_s"]])
    small, large = sizes[0], sizes[-1]
    s_ms = per_size[f"{small[0]}x{small[1]}"]["management_plane_ms"]
    l_ms = per_size[f"{large[0]}x{large[1]}"]["management_plane_ms"]
    growth = ratio(l_ms, s_ms)
    scale = ratio(large[0] + large[1], small[0] + small[1])
    return {
        "bus": kind,
        "rows": rows,
        "per_size": per_size,
        "largest_ms": l_ms,
        "target_ms": target_ms,
        "target_met": l_ms < target_ms,
        "growth_factor": growth,
        "size_factor": scale,
        "runs": runs,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bus", choices=("memory", "rabbitmq", "both"), default="both")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--elements", default="1000,10000", help="comma-separated element counts")
    p.add_argument("--events", default="10000,100000", help="comma-separated queued-event counts")
    p.add_argument("--window", type=int, default=512, help="event publishes in flight while queueing")
    p.add_argument("--target-ms", type=float, default=2000.0)
    args = p.parse_args()
    els = [int(x) for x in args.elements.split(",")]
    evs = [int(x) for x in args.events.split(",")]
    sizes = [(e, q) for q in evs for e in els]
    sizes.sort(key=lambda s: (s[0] * s[1], s))
    kinds = ("memory", "rabbitmq") if args.bus == "both" else (args.bus,)
    results = {k: summarize(k, asyncio.run(run(k, sizes, args.reps, args.window)), sizes, args.target_ms) for k in kinds}
    print(f"\nmanagement-plane time (saga start to completed, minus the VM migration), medians of {args.reps}; {ONE_PROCESS}")
    rows = [r for res in results.values() for r in res["rows"]]
    print(table(rows, ["bus", "elements", "events", "mgmt ms", "step 3 ms", "step 4 ms", "step 7 ms", "drain s"]))
    print()
    summary = []
    for k, res in results.items():
        summary.append([k, res["largest_ms"], f"< {args.target_ms:g} ms: {'MET' if res['target_met'] else 'MISSED'}",
                        res["growth_factor"], res["size_factor"]])
    print(table(summary, ["bus", "largest mgmt ms", "target", "growth small->large", "size factor"]))
    path = write_results("scale", {"setup": ONE_PROCESS, "results": results})
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
