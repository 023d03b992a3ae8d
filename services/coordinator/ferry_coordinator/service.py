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
import re
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError

from ferry_common.bus.interfaces import Consumer, Message, QueueSpec
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
from ferry_common.endpoint import Context, Endpoint, Router
from ferry_common.errors import Conflict, FerryError, InvalidMessage
from ferry_common.ids import new_id
from ferry_common.messages.commands import (
    Done,
    GetTrace,
    Inspect,
    Inspection,
    LeaseGrant,
    LeaseRequest,
    ListMigrations,
    MigrationList,
    TraceSpans,
    VmMigrationFinished,
)
from ferry_common.messages.limits import MAX_BODY_BYTES, MAX_STRING, Name
from ferry_common.messages.public import (
    HostInventory,
    MigrateRequest,
    MigrationCancel,
    MigrationStatusEvent,
)
from ferry_common.messages.telemetry import SpanBatch

from . import observe
from .fleet import drain_endpoint
from .fleet import metrics as fleet_metrics
from .fleet.drain_manager import DrainManager
from .fleet.liveness import LivenessTracker
from .hosts import HostRegistry
from .saga import BusPort, MigrationSaga, SagaContext
from .saga.state import SagaState
from .store import SagaRecord, SagaStore
from .timeouts import SagaTimeouts

log = logging.getLogger(__name__)
_NAME: TypeAdapter[str] = TypeAdapter(Name)


class CoordinatorService:
    service = "coordinator"

    def __init__(self, endpoint: Endpoint, store: SagaStore, *, timeouts: SagaTimeouts | None = None) -> None:
        self.endpoint = endpoint
        self.store = store
        self.timeouts = timeouts or SagaTimeouts()
        self.owner = endpoint.instance
        self.hosts = HostRegistry()
        # inventories are the hosts' heartbeats: not ready after 3 missed periods
        self.liveness = LivenessTracker(endpoint.clock, on_change=fleet_metrics.observe_host_ready)
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
        self.router.refused = self.on_refused
        # host drains: state in the store, advanced by every replica (fleet/drain_manager.py)
        self.drains = DrainManager(store, self.hosts, endpoint.clock, self._publish_any,
                                   ready=self.liveness.states, on_abort=self.cancels.__setitem__,
                                   warmup_s=self.liveness.bound_s())
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
        self._consumers.append(await self.endpoint.serve(private, self.private))
        self._consumers.append(await self.endpoint.serve(shared, self.router))
        self._lease_task = asyncio.create_task(self._lease_loop())
        self._liveness_task = asyncio.create_task(self.liveness.run())
        self._drain_task = asyncio.create_task(self.drains.run())

    async def stop(self) -> None:
        for task in (self._lease_task, self._liveness_task, self._drain_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for c in self._consumers:
            await c.cancel()
        self._consumers.clear()
        for t in self.running.values():
            t.cancel()
        for t in list(self.running.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self.running.clear()

    # ---- requests -------------------------------------------------------------------
    async def on_migrate_request(self, msg: MigrateRequest, ctx: Context) -> Done | None:
        # without a client-chosen id, the message's own id: a redelivery is then the same request
        mid = msg.migration_id or _as_migration_id(ctx.message.message_id) or new_id()
        now = self.endpoint.clock.now()
        existing = await self.store.get(mid)
        if existing is not None:
            if ctx.redelivered and existing.owner == self.owner and not existing.terminal:
                # the first delivery stored it and then lost its connection before it drove it
                self._drive(existing)
            return Done(detail={"migration_id": mid, "status": existing.status, "duplicate": True})
        located = self.hosts.locate(msg.vm_id)
        source = located[0] if located else ""
        record = SagaRecord(
            migration_id=mid,
            vm_id=msg.vm_id,
            source_host=source,
            target_host=msg.target_host,
            created_at=now,
            updated_at=now,
            owner=self.owner,
            lease_until=now + self.timeouts.lease_s,
        )
        state = SagaState(params=dict(msg.params), requested_by=ctx.sender, reason_requested=msg.reason)
        verdict = self._judge(msg, located)
        if verdict is not None:
            code, reason = verdict
            record.status, record.step = "rejected", "request"
            state.code, state.reason = code, reason
            record.data = state.dump()
            stored, created = await self.store.create(record)
            if created:
                await self._announce(stored, "rejected", reason=reason, code=code)
            return Done(detail={"migration_id": mid, "status": "rejected", "code": code, "reason": reason})
        assert located is not None
        state.vm = located[1]
        state.target_ready = self.hosts.ready_for(msg.target_host, located[1])
        owner = await self.owner_of(msg.vm_id)
        state.epoch = owner[1] if owner else 0
        params = dict(located[1].params.get("migration", {})) if isinstance(located[1].params.get("migration"), dict) else {}
        state.params = {**params, **msg.params}
        record.data = state.dump()
        stored, created = await self.store.create(record)
        if not created:
            if stored.migration_id == mid:
                return Done(detail={"migration_id": mid, "status": stored.status, "duplicate": True})
            reason = f"vm {msg.vm_id} is already migrating ({stored.migration_id})"
            rejected = SagaRecord(
                migration_id=mid, vm_id=msg.vm_id, source_host=source, target_host=msg.target_host,
                status="rejected", step="request", created_at=now, updated_at=now,
                data=SagaState.model_validate({"code": "already_migrating", "reason": reason,
                                               "running_migration_id": stored.migration_id}).dump(),
            )
            await self.store.create(rejected)  # terminal: does not block the running saga
            await self._announce(rejected, "rejected", reason=reason, code="already_migrating",
                                 running=stored.migration_id)
            return Done(detail={"migration_id": mid, "status": "rejected", "code": "already_migrating",
                                "running_migration_id": stored.migration_id})
        # driven before it is announced: an announcement lost with the connection must not
        # leave a stored saga that nobody drives until its lease runs out
        self._drive(stored)
        await self._announce(stored, "accepted")
        return Done(detail={"migration_id": mid, "status": "accepted"})

    async def on_refused(self, msg: Message, exc: FerryError) -> None:
        """An invalid MigrateRequest was dead-lettered: if it names a migration or a VM, publish
        ``migration.rejected`` with code ``invalid_request``, so a client without a reply queue
        learns what was wrong. A migration id that is already taken is left alone."""
        if msg.routing_key != MIGRATION_REQUESTED or not isinstance(exc, InvalidMessage):
            return
        salvaged = _salvage_ids(msg.body)
        if salvaged is None:
            return
        mid, vm_id = salvaged
        if mid is not None and await self.store.get(mid) is not None:
            return
        event = MigrationStatusEvent(
            migration_id=mid or new_id(),
            vm_id=vm_id or "unknown",
            status="rejected",
            step="request",
            reason=exc.reason[:MAX_STRING],
            code="invalid_request",
            at=self.endpoint.clock.now(),
        )
        await self.endpoint.send(migration_status("rejected"), event, mandatory=False)  # if anyone listens

    def _judge(self, msg: MigrateRequest, located: Any) -> tuple[str, str] | None:
        if not self.hosts.known(msg.target_host):
            return "unknown_host", f"target host {msg.target_host!r} is unknown"
        if located is None:
            return "unknown_vm", f"vm {msg.vm_id!r} runs on no known host"
        if located[0] == msg.target_host:
            return "same_host", f"vm {msg.vm_id!r} already runs on {msg.target_host!r}"
        return None

    async def on_cancel(self, msg: MigrationCancel, ctx: Context) -> Done:
        rec = await self.store.request_cancel(msg.migration_id)
        if rec is None:
            raise InvalidMessage(f"no migration {msg.migration_id!r}")
        if rec.terminal:
            raise Conflict(f"migration {msg.migration_id} already ended {rec.status}")
        if SagaState.load(rec.data).switched:
            raise Conflict(f"migration {msg.migration_id} is past the switch-over; it completes")
        self.cancels[msg.migration_id] = msg.reason
        return Done(detail={"migration_id": msg.migration_id, "cancel": "requested"})

    async def on_list(self, msg: ListMigrations, ctx: Context) -> MigrationList:
        if msg.migration_id is not None:
            rec = await self.store.get(msg.migration_id)
            return MigrationList(migrations=[rec.to_dict()] if rec is not None else [])
        rows = await self.store.list(vm_id=msg.vm_id, limit=msg.limit)
        return MigrationList(migrations=[r.to_dict() for r in rows])

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
        self.hosts.update(msg, self.endpoint.clock.monotonic())
        self.liveness.beat(msg.host, period_s=msg.period_s)
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

    async def _on_finished(self, rec: SagaRecord) -> None:
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

    async def _announce(self, rec: SagaRecord, status: str, *, reason: str | None = None,
                        code: str | None = None, running: str | None = None) -> None:
        if status == "rejected":
            observe.migration_rejected()
        event = MigrationStatusEvent(
            migration_id=rec.migration_id,
            vm_id=rec.vm_id,
            status=status,  # type: ignore[arg-type]
            source_host=rec.source_host or None,
            target_host=rec.target_host,
            reason=reason,
            code=code,
            running_migration_id=running,
            at=self.endpoint.clock.now(),
        )
        await self.endpoint.send(migration_status(status), event, mandatory=False)  # if anyone listens

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


def _salvage_ids(body: bytes) -> tuple[str | None, str | None] | None:
    """``migration_id`` and ``vm_id`` of a request that did not validate, where they are valid."""
    if len(body) > MAX_BODY_BYTES:
        return None
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(raw, dict):
        return None
    found: list[str | None] = []
    for key in ("migration_id", "vm_id"):
        try:
            found.append(_NAME.validate_python(raw.get(key)))
        except ValidationError:
            found.append(None)
    mid, vm_id = found
    return (mid, vm_id) if mid or vm_id else None


_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$")


def _as_migration_id(message_id: str | None) -> str | None:
    """A message id usable as a migration id (the ``Name`` rule), else None."""
    return message_id if message_id and _ID.match(message_id) else None
