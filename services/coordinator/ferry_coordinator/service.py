"""The coordinator service: takes MigrateRequests and cancels, runs sagas, answers queries.

Replicas share the durable queue ``ferry.coordinator`` (competing consumers) and the
saga store; a saga is driven by the replica that holds its lease, and any replica
takes over sagas whose lease ran out. Each replica has its own reply queue, its own
notification key for hypervisor results, and its own copy of the host inventory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import replace
from typing import Any

from ferry_common.aio import cancel_and_wait
from ferry_common.bus.interfaces import Consumer, QueueSpec
from ferry_common.bus.topology import (
    COORDINATOR_QUERY,
    COORDINATOR_QUEUE,
    INVENTORIES,
    MIGRATION_CANCEL,
    MIGRATION_REQUESTED,
    SAGA_NOTIFY,
    TELEMETRY_SPANS,
    migration_status,
)
from ferry_common.clock import Clock
from ferry_common.endpoint import Context, Endpoint, Router
from ferry_common.errors import FerryError
from ferry_common.messages.commands import (
    GetLimits,
    GetTrace,
    HostList,
    Inspect,
    Inspection,
    LeaseGrant,
    LeaseRequest,
    LimitsInfo,
    ListHosts,
    ListMigrations,
    MigrationList,
    TraceSpans,
    VmMigrationFinished,
)
from ferry_common.messages.public import (
    HostInventory,
    MigrateRequest,
    MigrationCancel,
    MigrationStatusEvent,
)
from ferry_common.messages.telemetry import SpanBatch

from . import observe
from .autonomic import AutonomicOptions, AutonomicService
from .fleet import drain_endpoint
from .fleet import metrics as fleet_metrics
from .fleet.dispatcher import Dispatcher
from .fleet.drain_manager import DrainManager
from .fleet.fleetview import CoordinatorFleet
from .fleet.liveness import LivenessTracker
from .fleet.queue import EntryState
from .fleet.settled import Settled
from .hosts import HostRegistry
from .requests import Requests
from .saga import BusPort, MigrationSaga, SagaContext
from .saga.state import SagaState
from .store import SagaRecord, SagaStore
from .timeouts import SagaTimeouts

log = logging.getLogger(__name__)


class CoordinatorService(Requests):
    service = "coordinator"

    def __init__(self, endpoint: Endpoint, store: SagaStore, *, timeouts: SagaTimeouts | None = None,
                 autonomic: AutonomicOptions | None = None) -> None:
        self.endpoint = endpoint
        self.store = store
        self.timeouts = timeouts or SagaTimeouts()
        self.owner = endpoint.instance
        self.hosts = HostRegistry()
        # inventories are the hosts' heartbeats: not ready after 3 missed periods
        self.liveness = LivenessTracker(endpoint.clock, on_change=fleet_metrics.observe_host_ready)
        # placement's view: inventories, liveness, cordons; the slots held come from the store
        self.fleet = CoordinatorFleet(store, self.hosts.locate)
        self.liveness.subscribe(self.fleet.set_ready)
        self.liveness.subscribe(lambda host, ready: self.dispatcher.wake())
        # whether "no host reports this VM" can be believed (requests.py's awaiting inventory)
        self.settled = Settled(endpoint.clock, self.liveness, self.hosts)
        self.dispatcher = Dispatcher(store, endpoint.clock, self.owner, start=self.start_entry,
                                     announce=self.announce_queued, refresh=self.refresh_queued)
        self._dispatch_task: asyncio.Task[None] | None = None
        self._liveness_task: asyncio.Task[None] | None = None
        self.running: dict[str, asyncio.Task[SagaRecord]] = {}
        self.cancels: dict[str, str] = {}
        self.owners: dict[str, tuple[str, int]] = {}
        self._notifications: dict[str, asyncio.Queue[VmMigrationFinished]] = {}
        self._consumers: list[Consumer] = []
        self._lease_task: asyncio.Task[None] | None = None
        self.finished: list[SagaRecord] = []
        self.notify_key = f"{SAGA_NOTIFY}.{self.owner}"
        self.port = BusPort(endpoint)

        self.router = Router()
        self.router.route_key(MIGRATION_REQUESTED, MigrateRequest)
        self.router.route_key(MIGRATION_CANCEL, MigrationCancel)
        self.router.add(MigrateRequest, self.on_migrate_request)
        self.router.add(MigrationCancel, self.on_cancel)
        self.router.add(ListMigrations, self.on_list)
        self.router.add(GetTrace, self.on_trace)
        self.router.add(SpanBatch, self.on_spans)
        self.router.add(Inspect, self.on_inspect)
        self.router.add(LeaseRequest, self.on_lease)
        self.router.add(ListHosts, self.on_hosts)
        self.router.add(GetLimits, self.on_limits)
        self.router.refused = self.on_refused
        self.autonomic = AutonomicService(self, autonomic)  # the balancer (ferry_coordinator.autonomic)
        self.autonomic.route(self.router)
        # host drains: state in the store, advanced by every replica (fleet/drain_manager.py)
        self.drains = DrainManager(store, self.hosts, endpoint.clock, self._publish_any,
                                   ready=self.liveness.states, on_abort=self.cancels.__setitem__,
                                   warmup_s=self.liveness.bound_s(), settled=self.settled)
        self._drain_task: asyncio.Task[None] | None = None
        drain_endpoint.DrainEndpoint(self.drains).install(self.router)
        self.private = Router()
        self.private.route_key(INVENTORIES, HostInventory)
        self.private.add(HostInventory, self.on_inventory)
        self.private.add(VmMigrationFinished, self.on_vm_finished)

    async def start(self) -> None:
        shared = QueueSpec(COORDINATOR_QUEUE, (MIGRATION_REQUESTED, MIGRATION_CANCEL, COORDINATOR_QUERY, TELEMETRY_SPANS, *drain_endpoint.KEYS), prefetch=128)
        private = QueueSpec(f"coordinator.{self.owner}", (INVENTORIES, self.notify_key), durable=False, prefetch=256)
        # every saga step is a request: the replies' queue is there before the first one
        await self.endpoint.open_replies()
        # private first: inventory must be known before requests are judged
        self.settled.restart()
        self._consumers.append(await self.endpoint.serve(private, self.private))
        self._consumers.append(await self.endpoint.serve(shared, self.router))
        self._lease_task = asyncio.create_task(self._lease_loop())
        self._liveness_task = asyncio.create_task(self.liveness.run())
        self._dispatch_task = asyncio.create_task(self.dispatcher.run(), name=f"dispatcher:{self.owner}")
        self._drain_task = asyncio.create_task(self.drains.run(), name=f"drains:{self.owner}")
        await self.autonomic.start()

    async def stop(self) -> None:
        await self.autonomic.stop()
        await cancel_and_wait(self._dispatch_task, self._lease_task, self._liveness_task, self._drain_task)
        for c in self._consumers:
            await c.cancel()
        self._consumers.clear()
        for t in self.running.values():
            t.cancel()
        for t in list(self.running.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self.running.clear()

    # ---- queries ----------------------------------------------------------------------
    @property
    def clock(self) -> Clock:
        return self.endpoint.clock

    async def on_list(self, msg: ListMigrations, ctx: Context) -> MigrationList:
        """Saga records, newest first, after the queued migrations (which have none yet)."""
        queued = [q for q in await self._queued_rows() if msg.vm_id in (None, q["vm_id"])
                  and msg.migration_id in (None, q["migration_id"])]
        if msg.migration_id is not None:
            rec = await self.store.get(msg.migration_id)
            return MigrationList(migrations=[rec.to_dict()] if rec is not None else queued[:1])
        rows = await self.store.list(vm_id=msg.vm_id, limit=msg.limit)
        return MigrationList(migrations=(queued + [r.to_dict() for r in rows])[: msg.limit])

    async def _queued_rows(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for d in await self.store.queue.explain(now=self.clock.now()):
            e = d.entry
            out.append({"migration_id": e.migration_id, "vm_id": e.vm_id, "source_host": e.source_host,
                        "target_host": d.target or "", "status": "queued",
                        "step": d.reason.value if d.reason is not None else "starting",
                        "created_at": e.enqueued_at, "updated_at": e.enqueued_at,
                        "data": {"code": d.reason.value if d.reason else None,
                                 "reason": e.placement_note or (d.reason.value if d.reason else "starting"),
                                 "priority": e.priority.name.lower(), "candidates": list(e.candidates)},
                        "history": []})
        return out

    async def on_hosts(self, msg: ListHosts, ctx: Context) -> HostList:
        return HostList(hosts=await self.fleet.rows())

    async def on_limits(self, msg: GetLimits, ctx: Context) -> LimitsInfo:
        queue = self.store.queue
        limits = await queue.limits()
        changes = {k: v for k, v in (("cluster", msg.cluster), ("outbound_per_host", msg.outbound_per_host),
                                     ("inbound_per_host", msg.inbound_per_host)) if v is not None}
        if changes:
            limits = await queue.set_limits(replace(limits, **changes))
            log.info("limits changed by %s: %s", ctx.sender, limits.to_dict())
            self.dispatcher.wake()
        started = await queue.entries(states={EntryState.STARTED})
        queued = await queue.entries(states={EntryState.QUEUED})
        return LimitsInfo(limits=limits.to_dict(), in_flight=len(started), queued=len(queued))

    async def on_trace(self, msg: GetTrace, ctx: Context) -> TraceSpans:
        return TraceSpans(spans=await self.store.spans(msg.migration_id))

    async def on_spans(self, msg: SpanBatch, ctx: Context) -> None:
        """Keep the spans services shipped (``telemetry.spans``) by migration, for ``ferry trace``."""
        by_migration: dict[str, list[dict[str, Any]]] = {}
        for span in msg.spans:
            by_migration.setdefault(span.migration_id, []).append(span.model_dump(mode="json"))
        for mid, spans in by_migration.items():
            await self.store.add_spans(mid, spans)
        return None

    async def on_inspect(self, msg: Inspect, ctx: Context) -> Inspection:
        return Inspection(host=self.owner, service=self.service, data={"placement": self.hosts.placement(), "running": sorted(self.running)})

    # ---- private ----------------------------------------------------------------------
    async def on_inventory(self, msg: HostInventory, ctx: Context) -> None:
        if msg.heartbeat:  # the host lives; what it holds, its next inventory says
            self.liveness.beat(msg.host, period_s=msg.period_s)
            return None
        before = self.hosts.hosts.get(msg.host)
        self.hosts.update(msg, self.endpoint.clock.monotonic())
        self.fleet.update(msg)
        self.liveness.beat(msg.host, period_s=msg.period_s)
        if before is None or before.vms != msg.vms or before.capacity_mib != msg.capacity_mib:
            self.dispatcher.wake()  # a VM arrived or left: placement and claims may change
        return None

    async def on_vm_finished(self, msg: VmMigrationFinished, ctx: Context) -> None:
        self._queue(msg.migration_id).put_nowait(msg)
        return None

    def _queue(self, mid: str) -> asyncio.Queue[VmMigrationFinished]:
        return self._notifications.setdefault(mid, asyncio.Queue())

    async def _wait_notification(self, mid: str, timeout: float) -> VmMigrationFinished | None:
        q = self._queue(mid)
        if not q.empty():
            return q.get_nowait()
        getter = asyncio.ensure_future(q.get())
        sleeper = asyncio.ensure_future(self.endpoint.clock.sleep(timeout))
        try:
            done, _ = await asyncio.wait({getter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            if not getter.done():
                getter.cancel()
        return getter.result() if getter in done and not getter.cancelled() else None

    # ---- sagas ------------------------------------------------------------------------
    def _drive(self, rec: SagaRecord) -> None:
        if rec.migration_id in self.running:
            return
        ctx = SagaContext(
            port=self.port,
            clock=self.endpoint.clock,
            identity=self.endpoint.identity,
            publish=self._publish_status,
            store=self.store,
            timeouts=self.timeouts,
            owner=self.owner,
            notify_key=self.notify_key,
            wait_notification=self._wait_notification,
            cancel_reason=self.cancels.get,
            on_finished=self._on_finished,
            on_owner=self._set_owner,
            host_down=self._host_down,
        )
        task = asyncio.create_task(MigrationSaga(ctx, rec).run(), name=f"saga:{rec.migration_id}")
        self.running[rec.migration_id] = task

        def done(t: asyncio.Task[SagaRecord]) -> None:
            self.running.pop(rec.migration_id, None)
            self._notifications.pop(rec.migration_id, None)
            self.cancels.pop(rec.migration_id, None)
            if not t.cancelled() and t.exception() is not None:
                log.error("saga %s crashed", rec.migration_id, exc_info=t.exception())

        task.add_done_callback(done)

    # ---- ownership: who may dispatch a VM's events --------------------------------------
    def _set_owner(self, vm_id: str, host: str, epoch: int) -> None:
        self.owners[vm_id] = (host, epoch)

    async def owner_of(self, vm_id: str) -> tuple[str, int] | None:
        """The host that owns ``vm_id``'s management plane, and the ownership epoch."""
        known = self.owners.get(vm_id)
        if known is not None:
            return known
        for rec in await self.store.list(vm_id=vm_id, limit=20):
            new_epoch = SagaState.load(rec.data).new_epoch
            if new_epoch is not None and rec.status in ("completed", "running"):
                # the saga that moved it last (or is handing it over right now)
                self.owners[vm_id] = (rec.target_host, new_epoch)
                return self.owners[vm_id]
        located = self.hosts.locate(vm_id)
        return (located[0], 0) if located else None

    async def on_lease(self, msg: LeaseRequest, ctx: Context) -> LeaseGrant:
        granted, moved = [], {}
        for vm_id in msg.vms:
            owner = await self.owner_of(vm_id)
            if owner is None:
                continue  # not known yet (inventory on its way): ask again
            if owner[0] == msg.host:
                granted.append(vm_id)
            else:
                moved[vm_id] = owner[0]
        return LeaseGrant(ttl_s=self.timeouts.ownership_lease_s, granted=granted, moved=moved)

    async def _host_down(self, host: str) -> None:
        """Return once ``host`` is marked not ready while another host is not: when every host
        falls silent at once, the broker (or this replica's link to it) is down, not the hosts."""
        while True:
            await self.liveness.wait_not_ready(host)
            if any(ready for h, ready in self.liveness.states().items() if h != host):
                return
            await self.endpoint.clock.sleep(self.liveness.default_period_s / 2)

    async def _on_finished(self, rec: SagaRecord) -> None:
        self.dispatcher.wake()  # its slot is free (released with its terminal record)
        self.finished.append(rec)
        observe.migration_finished(rec)
        if rec.status == "completed":
            self.hosts.record_move(rec.vm_id, rec.target_host, self.endpoint.clock.monotonic())

    async def _lease_loop(self) -> None:
        """Renew what this replica drives; take over sagas whose driver went away."""
        while True:
            try:
                now = self.endpoint.clock.now()  # leases compare across machines: wall clock
                for mid in list(self.running):
                    await self.store.renew(mid, self.owner, until=now + self.timeouts.lease_s)
                for rec in await self.store.claim(self.owner, now=now, lease_s=self.timeouts.lease_s):
                    if rec.migration_id not in self.running:
                        log.info("resuming saga %s at %s (%s)", rec.migration_id, rec.step, rec.status)
                        self._drive(rec)
            except FerryError as exc:
                log.warning("lease loop: %s", exc.reason)
            except Exception:
                log.exception("lease loop failed")
            await self.endpoint.clock.sleep(self.timeouts.lease_s / 3)

    async def _send_status(self, event: MigrationStatusEvent) -> None:
        await self.endpoint.send(migration_status(event.status), event, mandatory=False)  # if anyone listens

    async def _publish_any(self, key: str, event: Any) -> None:
        await self.endpoint.send(key, event, mandatory=False)  # if anyone listens

    async def _publish_status(self, event: MigrationStatusEvent) -> None:
        # nobody may follow this migration (its record still says it all): not mandatory, so
        # the broker drops it instead of returning it
        await self.endpoint.send(migration_status(event.status), event, mandatory=False)

    async def wait_idle(self) -> None:
        """Wait until no saga runs here (tests, demo)."""
        while self.running:
            await asyncio.gather(*self.running.values(), return_exceptions=True)
