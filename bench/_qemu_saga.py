"""Part (b) of ``bench/qemu_bare_vs_saga.py``: the same migration as a Ferry saga, over the
real RabbitMQ, with the hosts' services in this process or each in its own (``split``).

Run as ``_qemu_saga.py --publish URL VM COUNT`` it is the saga runner's event producer.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from ferry_cli.client import TERMINAL
from ferry_common.messages.domain import VmSpec
from ferry_hypervisor_adapter.drivers.base import MigrationParams
from ferry_hypervisor_adapter.drivers.guest import build_guest
from ferry_hypervisor_adapter.drivers.qemu import QemuDriver

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the split runner's parts
from _qemu_split import ready, service_processes  # noqa: E402

GUEST_VCPUS = 2  # as the saga's sample VM (ferry_testing.sample.vm_spec): both parts move the same machine


# events published during the migration (--events); standby: the target keeps a receiving QEMU
# of the guest's shape ready (--no-standby: it starts one when asked, inside the saga's time)
SAGA_CONFIG: dict[str, int] = {"events": 5000, "standby": 1}
REPO = Path(__file__).resolve().parents[1]
SAGA_EXTRA_ELEMENTS = 40
# the statuses the saga's client watches (--watch-all: every one, as `ferry migrate` does)
SAGA_WATCH: list[str] = list(TERMINAL)


class _StepClock:
    """Wraps two sensor handlers to time the management plane's blackout.

    Blackout: from the source sensor freezing the VM's events (step 2, ``FreezeEvents``)
    until the target sensor has handed the queued backlog to dispatch (step 7,
    ``MigrationComplete``). Everything runs in one process, so one monotonic clock serves.
    """

    def __init__(self) -> None:
        self.frozen_at: float | None = None
        self.resumed_at: float | None = None

    def wrap(self, service: Any, message: str, attr: str) -> None:
        model, handler = service.router.handlers[message]

        async def timed(msg: Any, ctx: Any) -> Any:
            answer = await handler(msg, ctx)
            setattr(self, attr, time.perf_counter())
            return answer

        service.router.handlers[message] = (model, timed)

    @property
    def blackout_ms(self) -> float:
        assert self.frozen_at is not None and self.resumed_at is not None
        return (self.resumed_at - self.frozen_at) * 1000


async def _publish_events(url: str, vm_id: str, count: int) -> None:
    """Publish ``count`` events of ``vm_id`` from this (separate) process, as a producer would."""
    from ferry_common.bus.amqp import AmqpBus
    from ferry_common.bus.topology import vm_events
    from ferry_common.endpoint import Endpoint
    from ferry_common.messages.public import VmEvent
    from ferry_testing.sample import event

    bus = AmqpBus(url, name="bench-producer")
    await bus.connect()
    endpoint = Endpoint(bus, "client/bench-producer")
    base = 2_000_000.0
    # connected: say so, and start publishing when told (the migration request follows at once)
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    for i in range(count):
        ev = event(vm_id, 100_000 + i, base + i)
        await endpoint.send(vm_events(vm_id), VmEvent.model_validate(ev.model_dump()))
    await endpoint.close()
    await bus.close()


async def floor_rtt_ms(url: str, samples: int = 40) -> float:
    """The median of ``samples`` request/replies through two :class:`Endpoint` s on ``url``,
    each as one saga step goes (a durable quorum queue, publisher confirms, mandatory routing,
    a traced and signed message each way): this machine's yardstick, taken in the saga's
    own process beside it, for the hops the saga's overhead is made of."""
    from _common import echo_pair, round_trips_ms  # bench/ is this script's directory

    from ferry_common.bus.amqp import AmqpBus

    buses = [AmqpBus(url, name=f"bench-floor-{i}") for i in range(2)]
    try:
        for bus in buses:
            await bus.connect()
        async with echo_pair(*buses) as call:
            rtts = await round_trips_ms(call, samples, warmup=10)
    finally:
        for bus in buses:
            await bus.close()
    return statistics.median(rtts)


async def saga_migration(
    guest: dict[str, int], memory_mib: int = 128, params: MigrationParams | None = None, *, split: bool = False
) -> dict[str, Any]:
    """One migration of the same guest as a full Ferry saga over the real RabbitMQ.

    The coordinator and both hosts' four services run in this process, each on its own AMQP
    connection to a private vhost; the adapters use :class:`QemuDriver`. ``split``: each host
    service runs in its own process instead (``ferry service NAME --host HOST``, as deployed),
    so the blackout (timed on the sensors' handlers) is not measured. The VM carries a
    management graph of ``SAGA_EXTRA_ELEMENTS`` + 8 elements (modules fetched from the
    source), and a separate producer process publishes ``SAGA_CONFIG["events"]`` events from the moment
    the migration is requested, so thousands queue while the VM's events are frozen.

    ``wall_ms`` runs from the MigrateRequest until the client sees ``completed``; the QEMU
    figures are the saga's record (``data["vm_stats"]``).
    """
    sys.path.insert(0, str(REPO))  # for tests.harness
    from ferry_cli.cluster import HostOptions
    from ferry_testing.sample import graph
    from tests.harness import amqp_url, make_cluster

    params = params or MigrationParams()
    base = Path(tempfile.mkdtemp(prefix="fs-", dir="/tmp"))
    image = str(build_guest())
    # split: hosts of their own name, so the processes' QEMU run directories are this run's
    src, dst = (f"sa-{base.name[3:]}", f"sb-{base.name[3:]}") if split else ("host-a", "host-b")
    options = {
        h: HostOptions(
            driver="qemu",
            driver_options={"run_dir": str(base / h[-1]), "guest_image": image,
                            "standby": f"{memory_mib}:{GUEST_VCPUS}" if SAGA_CONFIG["standby"] else None},
            capacity_mib=8192,
            inventory_interval_s=1.0,
        )
        for h in (src, dst)
    }
    # the client waits for the outcome only: one that shows progress runs elsewhere, and here
    # it would decode every status in the process that runs the services
    cluster = await make_cluster("rabbitmq", () if split else (src, dst), options=options, timeouts=SAGA_TIMEOUTS,
                                 watch=tuple(SAGA_WATCH))
    standby = f"{memory_mib}:{GUEST_VCPUS}" if SAGA_CONFIG["standby"] else None
    procs = service_processes(amqp_url(cluster.vhost or ""), (src, dst), standby) if split else []
    vm_id = f"s-{uuid.uuid4().hex[:8]}"
    try:
        if split:  # every process serves its queues (ready) and each adapter has reported
            await ready(procs, time.monotonic() + 60)
        for _ in range(1500):
            if all(cluster.coordinator.hosts.known(h) for h in (src, dst)):
                break
            await asyncio.sleep(0.02)
        await cluster.create_vm(src, vm_id, memory_mib=memory_mib, g=graph(vm_id, extra_elements=SAGA_EXTRA_ELEMENTS), **guest)
        await cluster.send_events(vm_id, 50)
        if not split:  # the ledgers are another process's when split
            await cluster.settle(vm_id)
        await asyncio.sleep(1.0)  # boot, and let a dirtying guest touch its whole region
        if SAGA_CONFIG["standby"]:
            spec = VmSpec(vm_id=vm_id, memory_mib=memory_mib, vcpus=GUEST_VCPUS, driver="qemu")
            for _ in range(500):  # the target's standby is up (it starts at once) and in its inventory
                if (split or cluster.host(dst).adapter.driver.standby.names()) and cluster.coordinator.hosts.ready_for(dst, spec):
                    break
                await asyncio.sleep(0.02)
        clock = _StepClock()
        if not split:
            clock.wrap(cluster.host(src).sensor, "FreezeEvents", "frozen_at")
            clock.wrap(cluster.host(dst).sensor, "MigrationComplete", "resumed_at")
        producer = None
        events_published_ms = 0.0
        events = SAGA_CONFIG["events"]
        if events:
            assert cluster.vhost is not None
            producer = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--publish", amqp_url(cluster.vhost), vm_id, str(events),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )
            assert producer.stdin is not None and producer.stdout is not None
            if (await producer.stdout.readline()).strip() != b"ready":
                raise RuntimeError("event producer did not start")
            producer.stdin.write(b"go\n")
            await producer.stdin.drain()
        started = time.perf_counter()
        # the wire takes JSON values: the ladder as a list, not the dataclass's tuple
        wire_params = {**params.to_dict(), "downtime_ladder_ms": list(params.downtime_ladder_ms)}
        mid = await cluster.client.migrate(vm_id, dst, params=wire_params)
        outcome = await cluster.client.outcome(mid, timeout=120)
        wall_ms = (time.perf_counter() - started) * 1000
        if producer is not None:
            await producer.wait()
            events_published_ms = (time.perf_counter() - started) * 1000
        rec = await cluster.store.get(mid)
        if outcome.status != "completed" or rec is None:
            raise RuntimeError(f"bench saga did not complete: {outcome}")
        dispatched = 0
        for _ in range(0 if split else 3000):  # until every published event was dispatched (30 s at most)
            dispatched = sum(h.managed_object.dispatched_count(vm_id) for h in cluster.hosts.values())
            if dispatched >= 50 + events:
                break
            await asyncio.sleep(0.01)
        drained_ms = (time.perf_counter() - started) * 1000
        assert cluster.vhost is not None
        floor = await floor_rtt_ms(amqp_url(cluster.vhost))
        steps = dict(rec.data.get("timings_ms", {}))
        return {
            "wall_ms": round(wall_ms, 3),
            **rec.data["vm_stats"],
            "blackout_ms": float("nan") if split else round(clock.blackout_ms, 3),
            "migrate_vm_ms": steps.get("migrate_vm", 0.0),
            "steps_ms": steps,
            "events_moved": rec.data.get("events_moved", 0),
            "events_dispatched_on_target": rec.data.get("events_dispatched_on_target", 0),
            "events_dispatched": dispatched,
            "events_sent": 50 + events,
            "dirty_rounds": rec.data.get("dirty_rounds", 0),
            "events_queued_at_freeze": rec.data.get("queued_at_freeze", 0),
            "events_published_ms": round(events_published_ms, 1),
            "events_drained_ms": round(drained_ms, 1),
            "floor_rtt_ms": round(floor, 3),
        }
    finally:
        for proc in procs:
            proc.terminate()  # SIGTERM: each service stops; the adapter's driver kills its standbys
        for proc in procs:
            await asyncio.to_thread(proc.wait, 30)
        for h in (src, dst):
            driver = cluster.hosts[h].adapter.driver if h in cluster.hosts else QemuDriver(h)
            await driver.destroy(vm_id)
            if split:
                shutil.rmtree(driver.run_dir, ignore_errors=True)
        await cluster.close()
        shutil.rmtree(base, ignore_errors=True)


async def split_migration(
    guest: dict[str, int], memory_mib: int = 128, params: MigrationParams | None = None
) -> dict[str, Any]:
    """:func:`saga_migration` with each host service in its own process."""
    return await saga_migration(guest, memory_mib, params, split=True)


def _saga_timeouts() -> Any:
    from ferry_coordinator.timeouts import SagaTimeouts

    # generous for TCG; dirty_round_s and status_poll_s at their defaults
    return SagaTimeouts(reply_s=10.0, attempts=2, forward_retry_s=0.05, forward_retry_max_s=0.5, lease_s=15.0)


SAGA_TIMEOUTS = _saga_timeouts()


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--publish":
        asyncio.run(_publish_events(sys.argv[2], sys.argv[3], int(sys.argv[4])))
