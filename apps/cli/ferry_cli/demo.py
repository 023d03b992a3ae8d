"""``ferry demo``: three hosts on the in-process bus, one VM with its management plane,
events flowing, and three migrations: one that completes, one that admission denies,
and one that an operator cancels mid-way. Ends with a verdict on each."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from ferry_common.bus.memory import MemoryBus
from ferry_common.endpoint import Endpoint
from ferry_common.messages.domain import Event
from ferry_common.messages.public import MigrationStatusEvent, VmEvent
from ferry_common.settings import Settings
from ferry_coordinator.store import MemorySagaStore
from ferry_coordinator.timeouts import SagaTimeouts
from ferry_testing.sample import MODULES, event, graph, vm_spec
from ferry_testing.verify import inspect_all, problems, replay, state_problems

from . import wiring
from .client import FerryClient
from .cluster import HostOptions, build_coordinator, build_host
from .render import render_trace

HOSTS = ["host-a", "host-b", "host-c"]
VM = "web-01"


class Demo:
    def __init__(self, *, rate: float, out: Any = print) -> None:
        self.rate = rate
        self.say = out
        self.sent: list[Event] = []
        self.t0 = time.monotonic()
        self.ts = 1_700_000_000.0

    def line(self, text: str) -> None:
        self.say(f"[{time.monotonic() - self.t0:6.2f}s] {text}")

    async def produce(self, client: FerryClient, stop: asyncio.Event) -> None:
        """A steady stream of service-plane events for the VM, whatever host it is on."""
        while not stop.is_set():
            self.ts += 0.001
            ev = event(VM, len(self.sent), self.ts)
            await client.send_event(VmEvent.model_validate(ev.model_dump()))
            self.sent.append(ev)
            await asyncio.sleep(1.0 / self.rate)

    def show(self, e: MigrationStatusEvent) -> None:
        if e.status == "progress" and e.step == "migrate_vm" and e.detail:
            d = e.detail
            self.line(
                f"    hypervisor: pass {d.get('passes')}, {d.get('percent')}% "
                f"({d.get('remaining_bytes', 0) // 2**20} MiB left, dirtying {d.get('dirty_pages_rate', 0) * 4096 // 2**20} MiB/s)"
            )
        elif e.status == "progress":
            self.line(f"  step {e.step}")
        else:
            why = f": {e.reason}" if e.reason else ""
            self.line(f"  => {e.status.upper()}{why}")


async def run_demo(*, rate: float = 400.0, settings: Settings | None = None) -> int:
    settings = settings or Settings()
    wiring.gc(settings)
    d = Demo(rate=rate)
    bus = MemoryBus()
    store = MemorySagaStore()
    # every step announced: the demo prints them one by one
    coordinator = build_coordinator(bus, store, timeouts=SagaTimeouts(reply_s=5.0, lease_s=30.0, progress_interval_s=0.0))
    await coordinator.start()
    # spans of each migration go over the bus to the coordinator, for the trace at the end
    shipper = wiring.tracing(settings, "ferry-demo").bus_exporter
    if shipper is not None:
        shipper.attach(coordinator.endpoint)
    options = {
        "host-a": HostOptions(inventory_interval_s=1.0),
        "host-b": HostOptions(inventory_interval_s=1.0),
        # host-c takes VMs only from host-a: admission on host-c denies host-b
        "host-c": HostOptions(inventory_interval_s=1.0, allowed_sources=("host-a",)),
    }
    hosts = {h: build_host(h, bus, options=options[h]) for h in HOSTS}
    for h in hosts.values():
        await h.start()
    client = FerryClient(Endpoint(bus, "client/demo"))
    await client.watch()
    verdicts: list[tuple[str, list[str]]] = []
    stop = asyncio.Event()
    producer: asyncio.Task[None] | None = None
    try:
        while not all(coordinator.hosts.known(h) for h in HOSTS):
            await asyncio.sleep(0.01)
        d.line(f"three hosts up on the in-process bus: {', '.join(HOSTS)}")
        g = graph(VM)
        spec = vm_spec(VM, memory_mib=2048, sim_dirty_mibps=120, sim_bandwidth_mibps=1024)
        await client.create_vm("host-a", spec, g, MODULES)
        while coordinator.hosts.locate(VM) is None:
            await asyncio.sleep(0.01)
        d.line(
            f"created {VM} on host-a: {len(g.elements)} managed elements, {len(g.embots)} embots, "
            f"{sum(len(b.policies) for b in g.embots)} policies, modules {', '.join(m.key for m in (r for r in g.manifest))}"
        )
        producer = asyncio.create_task(d.produce(client, stop))
        await asyncio.sleep(1.0)
        await show_state(d, client, "host-a")

        d.line(f"1) migrate {VM} host-a -> host-b while events flow ({rate:.0f}/s); host-b lacks its modules")
        mid = await client.migrate(VM, "host-b")

        async def operator_edits() -> None:
            await asyncio.sleep(1.2)
            await client.set_attributes("host-a", VM, f"{VM}.disk0", {"size_gib": 80})
            d.line("    operator resized disk0 on host-a mid-migration (a dirty object for step 6)")

        edit = asyncio.create_task(operator_edits())
        async for e in client.follow(mid, timeout=120):
            d.show(e)
        await edit
        await asyncio.sleep(0.5)
        stop.set()
        await producer
        await settle(client, d.sent)
        seen = await inspect_all(client, HOSTS, VM)
        found = problems(seen, VM, "host-b", d.sent) + state_problems(seen, VM, "host-b", replay(g, d.sent))
        disk0 = seen["host-b"]["managed_object"]["planes"][VM]["elements"][f"{VM}.disk0"]["attributes"]
        if disk0.get("size_gib") != 80:
            found.append(f"the mid-migration edit did not reach host-b: {disk0}")
        rec = (await client.migrations(VM, limit=1))[0]
        t = rec["data"].get("timings_ms", {})
        # events wait only from the freeze (once the VM was copied) until the target took over
        dark = sum(float(t.get(s, 0)) for s in ("freeze_events", "event_state", "switch_over", "complete"))
        d.line(
            f"   {len(d.sent)} events sent; {rec['data'].get('events_moved', 0)} moved at step 4, "
            f"{rec['data'].get('events_dispatched_on_target', 0)} dispatched on host-b at step 7; "
            f"modules fetched: {', '.join(rec['data'].get('modules_fetched', [])) or 'none'}"
        )
        d.line(
            f"   events were acted on at host-a while the VM was copied ({float(t.get('migrate_vm', 0)):.0f} ms, "
            f"{rec['data'].get('dirty_rounds', 0)} dirty rounds); they waited only {dark:.1f} ms, "
            "from the freeze until host-b took over"
        )
        verdicts.append(("completed migration", found))
        await show_state(d, client, "host-b")

        d.line("2) migrate host-b -> host-c: host-c admits only migrations from host-a")
        outcome = await client.outcome(await client.migrate(VM, "host-c"), timeout=30)
        d.show(outcome)
        seen = await inspect_all(client, HOSTS, VM)
        found = problems(seen, VM, "host-b", d.sent)
        if outcome.status != "rejected":
            found.append(f"expected a rejection, got {outcome.status}")
        verdicts.append(("denied by admission", found))

        d.line("3) migrate host-b -> host-a, and cancel it mid-way")
        stop.clear()
        producer = asyncio.create_task(d.produce(client, stop))
        mid3 = await client.migrate(VM, "host-a")
        async def cancel_soon() -> None:
            await asyncio.sleep(0.8)  # well inside the first pre-copy pass
            await client.cancel(mid3, "operator changed their mind")
            d.line("    operator cancelled")

        canceller: asyncio.Task[None] | None = None
        async for e in client.follow(mid3, timeout=120):
            d.show(e)
            if canceller is None and e.step == "migrate_vm":
                canceller = asyncio.create_task(cancel_soon())
            last = e
        if canceller is not None:
            await canceller
        stop.set()
        await producer
        await settle(client, d.sent)
        seen = await inspect_all(client, HOSTS, VM)
        found = problems(seen, VM, "host-b", d.sent) + state_problems(seen, VM, "host-b", replay(g, d.sent))
        if last.status != "rolled_back":
            found.append(f"expected rolled_back, got {last.status}")
        verdicts.append(("cancelled migration", found))

        if shipper is not None:
            await shipper.flush()
            await asyncio.sleep(0.2)  # the coordinator stores the last batch
        spans = await client.trace(mid)
        if spans:
            d.say("")
            d.say(f"trace of migration {mid}:")
            d.say(render_trace(spans))
    finally:
        stop.set()
        if producer is not None:
            with contextlib.suppress(Exception):
                await producer
        if shipper is not None:
            await shipper.detach(coordinator.endpoint)
        await client.close()
        await coordinator.stop()
        for h in hosts.values():
            await h.stop()
        await bus.close()

    d.say("")
    d.say("verdict:")
    ok = True
    for name, found in verdicts:
        d.say(f"  {'PASS' if not found else 'FAIL'}  {name}")
        for p in found:
            d.say(f"        - {p}")
        ok = ok and not found
    d.say(
        "  every event dispatched exactly once and in time order, policy state identical to a\n"
        "  single-host run, one active management plane where the VM runs, nothing left behind"
        if ok else "  the demo found problems (above)"
    )
    return 0 if ok else 1


async def settle(client: FerryClient, sent: list[Event], timeout: float = 10.0) -> None:
    want = {e.id for e in sent}
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        got: set[str] = set()
        for h in HOSTS:
            got.update((await client.inspect(h, VM))["managed_object"]["ledger"].get(VM, []))
        if want <= got:
            return
        await asyncio.sleep(0.05)


async def show_state(d: Demo, client: FerryClient, host: str) -> None:
    s = await client.inspect(host, VM)
    plane = s["managed_object"]["planes"][VM]
    load = plane["embots"][f"{VM}.load"]
    d.line(
        f"   on {host}: plane {plane['status']}, embot {VM}.load has seen {load.get('seen', 0)} events, "
        f"{load.get('high_samples', 0)} high-load samples, alarms {sorted(load.get('alarms', {}))}"
    )
