"""The sensor: events in, time-ordered dispatch out, queued while the VM migrates.

Events reach a host on ``vm.<vm_id>.event``: the sensor binds that key for every VM
whose events it takes. On the source the VM's events are *frozen* (queued) from step
2, which runs once the VM has been copied; the target binds the key at step 4 and
*stages* what arrives, so every event from then on reaches both hosts and none falls
between them. At step 7 the target merges the source's queue with its own, drops
duplicates by id and dispatches in time order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson
from pydantic import TypeAdapter

from ferry_common import metrics
from ferry_common.bus.topology import COORDINATOR_QUERY, VM_EVENTS, host_command, vm_events
from ferry_common.endpoint import Context, Endpoint, Forward
from ferry_common.errors import Conflict, FerryError, InvalidMessage
from ferry_common.messages.base import Wire
from ferry_common.messages.commands import (
    ActivateVmEvents,
    CleanupSource,
    CleanupTarget,
    Done,
    EventsFrozen,
    EventStateExport,
    ExportEventState,
    FreezeEvents,
    Inspect,
    Inspection,
    LeaseGrant,
    LeaseRequest,
    ManagedObjectInstantiationError,
    ManagementEventState,
    ManagementEventStateSuccess,
    MigrationComplete,
    MigrationCompleteAck,
    ReleaseVm,
    SendEventState,
    SourceTeardown,
    StageEvents,
)
from ferry_common.messages.domain import Event
from ferry_common.messages.public import VmEvent, VmEventBatch
from ferry_common.service import HostService
from ferry_common.state import StateStore

from .dispatch import EventDispatch, drained_ns, queue_ns
from .lease import LeaseBook
from .queues import VmEvents

log = logging.getLogger(__name__)
_EVENTS = TypeAdapter(list[Event])


class SensorService(HostService, EventDispatch):
    service = "sensor"

    def __init__(self, host: str, endpoint: Endpoint, state: StateStore | None = None) -> None:
        super().__init__(host, endpoint, state)
        self.vms: dict[str, VmEvents] = {}
        # vm_id -> migration that took it away (or whose staging was undone): events still
        # in our queue for it were published while the other host was bound too
        self.released: dict[str, str] = {}
        self.dispatched = 0
        self.duplicates = 0
        self._init_dispatch()
        self.leases = LeaseBook(endpoint.clock)
        self.lease_timeout_s = 5.0
        # as short as a lease request's: an answer lost (a reconnect) is retried by the lease
        # loop soon, and a chunk of 2,000 events is acted on in well under a second
        self.drain_chunk_timeout_s = 5.0
        self._renewing: asyncio.Task[None] | None = None
        self._lease_loop: asyncio.Task[None] | None = None
        self.held = 0
        r = self.router
        r.route_key(VM_EVENTS, VmEvent)
        r.add(VmEvent, self.on_event)
        r.add(VmEventBatch, self.on_batch)
        r.add(ActivateVmEvents, self.on_activate)
        r.add(ReleaseVm, self.on_release)
        r.add(Inspect, self.on_inspect)
        self.step(FreezeEvents, self.on_freeze)
        r.add(ExportEventState, self.on_export)
        r.add(SendEventState, self.on_send)
        self.step(StageEvents, self.on_stage)
        self.step(ManagementEventState, self.on_event_state)
        self.step(MigrationComplete, self.on_complete)
        self.step(SourceTeardown, self.on_teardown)
        self.step(CleanupTarget, self.on_cleanup_target)
        self.step(CleanupSource, self.on_cleanup_source)

    def bindings(self) -> tuple[str, ...]:
        return (host_command(self.host, self.service), *(vm_events(v) for v in self.vms))

    # ---- durable state: what the sensor must not lose across its own restart --------------
    async def restore(self) -> None:
        for vm_id, meta in await self.state.items("vm"):
            vm = VmEvents(vm_id, meta["mode"], meta.get("migration_id"), completed_by=meta.get("completed_by"),
                          epoch=int(meta.get("epoch", 0)))
            stored = await self.state.items(queue_ns(vm_id))
            for _, ids in await self.state.items(drained_ns(vm_id)):
                for event_id in ids:  # answered chunks of a drain the restart interrupted
                    vm.first_time(event_id)
            for _, raw in stored:
                for one in raw if isinstance(raw, list) else [raw]:  # a list: a step-4 transfer
                    vm.add(Event.model_validate(one))
            vm.seq = max((int(k) for k, _ in stored), default=0)  # new keys go after the old
            self.vms[vm_id] = vm
        self.released = dict(await self.state.items("released"))
        self._count_queued()

    async def _save(self, vm: VmEvents) -> None:
        await self.state.put("vm", vm.vm_id, vm.meta())

    async def _drop(self, vm_id: str, migration_id: str) -> None:
        self.released[vm_id] = migration_id
        await self.state.put("released", vm_id, migration_id)
        await self.state.delete("vm", vm_id)
        await self.state.clear(queue_ns(vm_id))
        await self.state.clear(drained_ns(vm_id))
        self._count_queued()

    def _count_queued(self) -> None:
        """Set the host's queued-events gauge from what is held (a recount, so it cannot drift)."""
        metrics.QUEUED_EVENTS.labels(host=self.host).set(sum(v.queued for v in self.vms.values()))

    # ---- events -------------------------------------------------------------------
    async def on_event(self, msg: VmEvent, ctx: Context) -> None:
        await self._take(msg.vm_id, [Event.model_validate(msg.model_dump())])

    async def on_batch(self, msg: VmEventBatch, ctx: Context) -> None:
        await self._take(msg.vm_id, msg.events)

    async def _take(self, vm_id: str, events: list[Event]) -> None:
        """Dispatch, queue or hold ``events`` (all of ``vm_id``), as each would be alone."""
        # everything up to the first await runs in delivery order: keep state changes here
        vm = self.vms.get(vm_id)
        if vm is None:
            if vm_id in self.released:
                # the key was bound here and on the target at once: the target has these events
                self.duplicates += len(events)
                return None
            raise InvalidMessage(f"vm {vm_id!r} is not on host {self.host!r}")
        active = vm.mode == "active"
        if active and not (vm.queued or vm.draining or vm.suspended or not self.leases.valid(vm_id)):
            fresh = [e for e in events if vm.first_time(e.id)]
            self.duplicates += len(events) - len(fresh)
            try:
                await self._dispatch(fresh)
            except BaseException:
                # not dispatched, nor held: the delivery comes again, and must not be taken for
                # duplicates then
                for e in fresh:
                    vm.seen.pop(e.id, None)
                raise
            return None
        # queued for a migration, or held (no lease, or older events still held): in order,
        # durably, before the delivery is acknowledged
        rows = []
        for e in events:
            if vm.add(e):
                rows.append((vm.store_key(), e.model_dump(mode="json")))
            else:
                self.duplicates += 1
        if not rows:
            return None
        if active:
            self.held += len(rows)
        else:
            metrics.QUEUED_EVENTS.labels(host=self.host).inc(len(rows))  # no recount on the hot path
        await self.state.put_many(queue_ns(vm.vm_id), rows)
        if active:
            self.renew_soon()
        return None

    # ---- leases ---------------------------------------------------------------------
    async def start(self) -> None:
        await super().start()
        self._lease_loop = asyncio.create_task(self._lease_forever())
        if any(v.mode == "active" and v.queued for v in self.vms.values()):
            self.renew_soon()  # restarted with events held: send them now, not a lease period later

    async def stop(self) -> None:
        for task in (self._lease_loop, self._renewing, *self._drains.values()):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._lease_loop = self._renewing = None
        await super().stop()

    def renew_soon(self) -> None:
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.create_task(self.renew())

    async def _lease_forever(self) -> None:
        while True:
            await self.endpoint.clock.sleep(max(self.leases.ttl_s / 3, 0.05))
            with contextlib.suppress(Exception):
                await self.renew()

    async def renew(self) -> None:
        """Renew the leases of active VMs; dispatch what was held for those granted."""
        active = [v.vm_id for v in self.vms.values() if v.mode == "active"]
        due = self.leases.due(active) or [v for v in active if self.vms[v].queued]
        if not due:
            return
        try:
            grant = await self.endpoint.request(
                COORDINATOR_QUERY, LeaseRequest(host=self.host, vms=due), timeout=self.lease_timeout_s
            )
        except FerryError as exc:
            log.info("lease renewal from %s failed (events are held meanwhile): %s", self.host, exc.reason)
            return
        if not isinstance(grant, LeaseGrant):
            return
        for vm_id in grant.granted:
            self.leases.grant(vm_id, grant.ttl_s)
        for vm_id in grant.granted:
            vm = self.vms.get(vm_id)
            if vm is not None:
                await self._drain_all(vm)
        for vm_id, owner in grant.moved.items():
            vm = self.vms.get(vm_id)
            if vm is not None and vm.mode == "active" and owner != self.host:
                # fenced: the VM is owned elsewhere; what we hold here reached the owner too
                log.warning("vm %s is owned by %s: %s stops taking its events", vm_id, owner, self.host)
                self.leases.surrender(vm_id)
                # unbound first: if that fails the VM is still here and the next renewal
                # fences it again, instead of the binding outliving what we know of it
                await self.endpoint.bus.unbind(self.queue, vm_events(vm_id))
                del self.vms[vm_id]
                await self._drop(vm_id, "fenced")

    # ---- commands -----------------------------------------------------------------
    async def on_activate(self, msg: ActivateVmEvents, ctx: Context) -> Done:
        if msg.vm_id not in self.vms:
            self.vms[msg.vm_id] = VmEvents(msg.vm_id, "active")
            self.renew_soon()
            self.released.pop(msg.vm_id, None)
            await self._save(self.vms[msg.vm_id])
        # bound on every delivery, not only the first: a bind lost with the connection is
        # made by the redelivery (binding twice is a no-op at the broker)
        await self.endpoint.bus.bind(self.queue, vm_events(msg.vm_id))
        return Done()

    async def on_release(self, msg: ReleaseVm, ctx: Context) -> Done:
        """The VM is given back to its operator: its events are no longer taken here."""
        vm = self.vms.get(msg.vm_id)
        if vm is not None:
            if vm.mode != "active":
                raise Conflict(f"vm {msg.vm_id!r} is {vm.mode} on {self.host!r} (migrating); release it afterwards")
            del self.vms[msg.vm_id]
            self.leases.surrender(msg.vm_id)
            await self.state.delete("vm", msg.vm_id)
            await self.state.clear(queue_ns(msg.vm_id))  # held for a lease: nobody manages it now
            await self.state.clear(drained_ns(msg.vm_id))
            self._count_queued()
        await self.endpoint.bus.unbind(self.queue, vm_events(msg.vm_id))
        return Done(detail={"released": vm is not None})

    async def on_freeze(self, msg: FreezeEvents, ctx: Context) -> Wire:
        vm = self.vms.get(msg.vm_id)
        if vm is None:
            raise Conflict(f"vm {msg.vm_id!r} takes no events on {self.host!r}")
        if vm.mode == "active":
            vm.mode, vm.migration_id, vm.frozen_at = "frozen", msg.migration_id, self.endpoint.clock.monotonic()
            self.leases.surrender(msg.vm_id)  # ownership can move now: we dispatch nothing more
            await self._save(vm)
        elif vm.migration_id != msg.migration_id:
            raise Conflict(f"vm {msg.vm_id!r} is {vm.mode} for migration {vm.migration_id}")
        # events taken before the freeze reach the managed-object service before the saga's
        # next step does: their dispatch is published before we answer
        await self._quiesce()
        return EventsFrozen(queued=vm.queued)

    async def on_export(self, msg: ExportEventState, ctx: Context) -> Wire:
        vm = self.vms.get(msg.vm_id)
        if vm is None or vm.migration_id != msg.migration_id or vm.mode != "frozen":
            raise Conflict(f"vm {msg.vm_id!r} is not frozen for migration {msg.migration_id}")
        return EventStateExport(events=vm.merged())

    async def on_send(self, msg: SendEventState, ctx: Context) -> Forward:
        """Step 4 on the source: the queue goes straight to the target's sensor, which answers
        the coordinator; sending it again (a retry, a redelivery) stages nothing twice there."""
        vm = self.vms.get(msg.vm_id)
        if vm is None or vm.migration_id != msg.migration_id or vm.mode != "frozen":
            raise Conflict(f"vm {msg.vm_id!r} is not frozen for migration {msg.migration_id}")
        state = ManagementEventState(migration_id=msg.migration_id, vm_id=msg.vm_id, events=vm.merged(),
                                     element_ids=msg.element_ids)
        return Forward(host_command(msg.target_host, "sensor"), state)

    async def on_stage(self, msg: StageEvents, ctx: Context) -> Wire:
        vm = self.vms.get(msg.vm_id)
        if vm is None:
            self.vms[msg.vm_id] = VmEvents(msg.vm_id, "staged", msg.migration_id)
            self.released.pop(msg.vm_id, None)
            await self._save(self.vms[msg.vm_id])
        elif vm.mode != "staged" or vm.migration_id != msg.migration_id:
            raise Conflict(f"vm {msg.vm_id!r} is already {vm.mode} here")
        # on a redelivery too: if the first bind went with the connection, the source would
        # be the only host taking the VM's events, and drop them at teardown
        await self.endpoint.bus.bind(self.queue, vm_events(msg.vm_id))
        return Done()

    async def on_event_state(self, msg: ManagementEventState, ctx: Context) -> Wire:
        vm = self.vms.get(msg.vm_id)
        if vm is None or vm.mode != "staged" or vm.migration_id != msg.migration_id:
            raise Conflict(f"vm {msg.vm_id!r} is not staged for migration {msg.migration_id}")
        known = set(msg.element_ids)
        strangers = sorted({e.element_id for e in msg.events if e.element_id not in known or e.vm_id != msg.vm_id})
        if strangers:
            return ManagedObjectInstantiationError(reason=f"events for elements not migrated: {', '.join(strangers[:5])}")
        fresh = [e for e in msg.events if vm.add(e)]
        if fresh:
            # one row for the whole transfer, written as pydantic-core serialises it (a row per
            # event costs more than the transfer itself); its key is that of its last event, so a
            # drain that took them all deletes it, and one that did not keeps it
            await self.state.put(queue_ns(vm.vm_id), vm.store_key(), orjson.Fragment(_EVENTS.dump_json(fresh)))
        self._count_queued()
        return ManagementEventStateSuccess(staged=len(fresh))

    async def on_complete(self, msg: MigrationComplete, ctx: Context) -> Wire:
        vm = self.vms.get(msg.vm_id)
        if vm is not None and vm.mode == "active" and vm.completed_by == msg.migration_id:
            return MigrationCompleteAck()  # done before a crash took the answer with it
        if vm is None or vm.migration_id != msg.migration_id:
            raise Conflict(f"vm {msg.vm_id!r} is not staged for migration {msg.migration_id}")
        backlog = vm.queued
        vm.mode, vm.migration_id, vm.completed_by, vm.epoch = "active", None, msg.migration_id, msg.epoch
        try:
            await self._save(vm)
        except BaseException:
            vm.mode, vm.migration_id, vm.completed_by, vm.epoch = "staged", msg.migration_id, None, 0
            raise
        self.leases.grant(msg.vm_id, msg.lease_s)
        # The merged queue is durable and this host owns the VM: the backlog is dispatched
        # from here on, in time order and ahead of newer events (held behind it), without
        # the saga waiting for it. A crash meanwhile finds the VM active with events held,
        # and the lease loop dispatches them; the managed-object service drops events it
        # has already seen, so each still acts once.
        self._drain_soon(vm)
        return MigrationCompleteAck(dispatched=backlog)

    async def on_teardown(self, msg: SourceTeardown, ctx: Context) -> Wire:
        vm = self.vms.get(msg.vm_id)
        if vm is not None and vm.migration_id == msg.migration_id:
            del self.vms[msg.vm_id]
            await self._drop(msg.vm_id, msg.migration_id)
        if msg.vm_id not in self.vms and self.released.get(msg.vm_id) == msg.migration_id:
            # also on a redelivery, in case the unbind went with the connection
            await self.endpoint.bus.unbind(self.queue, vm_events(msg.vm_id))
        return Done()

    async def on_cleanup_target(self, msg: CleanupTarget, ctx: Context) -> Wire:
        vm = self.vms.get(msg.vm_id)
        if vm is not None and vm.mode == "staged" and vm.migration_id == msg.migration_id:
            del self.vms[msg.vm_id]
            await self._drop(msg.vm_id, msg.migration_id)
            await self.endpoint.bus.unbind(self.queue, vm_events(msg.vm_id))
            return Done(detail={"purged": vm.queued})
        if vm is None and self.released.get(msg.vm_id) == msg.migration_id:
            await self.endpoint.bus.unbind(self.queue, vm_events(msg.vm_id))  # a redelivery
        return Done()

    async def on_cleanup_source(self, msg: CleanupSource, ctx: Context) -> Wire:
        vm = self.vms.get(msg.vm_id)
        if vm is None or vm.mode != "frozen" or vm.migration_id != msg.migration_id:
            return Done()
        vm.mode, vm.migration_id = "active", None
        await self._save(vm)
        # thawed: what queued up is held until the lease is ours again (the coordinator still
        # names this host the owner), then dispatched here in its original order, not dropped
        self.renew_soon()
        return Done(detail={"thawed": vm.queued})

    async def on_inspect(self, msg: Inspect, ctx: Context) -> Inspection:
        return Inspection(host=self.host, service=self.service, data=self.inspect(msg.vm_id))

    def inspect(self, vm_id: str | None) -> dict[str, Any]:
        vms = {
            v.vm_id: {"mode": v.mode, "migration_id": v.migration_id, "queued": v.queued}
            for v in self.vms.values()
            if vm_id is None or v.vm_id == vm_id
        }
        leases = {v: self.leases.valid(v) for v in vms}
        return {"vms": vms, "dispatched": self.dispatched, "duplicates": self.duplicates, "held": self.held,
                "leases": leases}
