"""A MigrateRequest's way in: judged, placed, queued; started by the dispatcher when a slot frees.

Every request goes through the fleet queue in the store (``FleetQueue``), whatever its
priority: the queue applies the limits, and its claim is the only way a saga starts. The
request itself is kept on the entry (``entry.request``), so whichever replica claims it, or
takes it over after a crash between the claim and the saga's creation, starts the same saga.

A request for a VM or target host that no inventory shows is rejected (``unknown_vm``,
``unknown_host``) at once only while the coordinator's picture of the hosts is settled
(fleet/settled.py) and no migration of the VM ended within its window. Otherwise (just
started, hosts just back after a broker outage, a guest just resumed by a roll-back) it waits
in the queue without a source (``awaiting_inventory``) until an inventory shows it, and is
rejected once the picture settles without it, or ``inventory_wait_s`` after it came.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import replace
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError

from ferry_common.bus.interfaces import Message
from ferry_common.bus.topology import MIGRATION_REQUESTED
from ferry_common.clock import Clock
from ferry_common.endpoint import Context
from ferry_common.errors import Conflict, FerryError, InvalidMessage
from ferry_common.ids import new_id
from ferry_common.messages.commands import Done
from ferry_common.messages.domain import VmSpec
from ferry_common.messages.limits import MAX_BODY_BYTES, MAX_STRING, Name
from ferry_common.messages.public import MigrateRequest, MigrationCancel, MigrationStatusEvent

from .fleet.dispatcher import Dispatcher
from .fleet.fleetview import CoordinatorFleet
from .fleet.queue import Decision, EntryState, Priority, QueueEntry, Reason, new_entry
from .fleet.settled import Settled
from .hosts import HostRegistry
from .saga.state import SagaState
from .store import SagaRecord, SagaStore
from .timeouts import SagaTimeouts

log = logging.getLogger(__name__)
_NAME: TypeAdapter[str] = TypeAdapter(Name)
#: targets a placed migration tries: the one it claimed, then others placement ranked when
#: one denies admission
MAX_TARGETS = 3
#: ranked targets kept on a queued entry: the claim takes the first whose inbound limit has room
CANDIDATES = 5
#: rejections that may only mean an inventory is not in yet
AWAITED = ("unknown_vm", "unknown_host")


def request_of(msg: MigrateRequest, requested_by: str | None) -> dict[str, Any]:
    """What an entry keeps to start its saga (``entry.request``). Other producers (drains,
    the balancer) may enqueue entries with fewer keys: every one is optional."""
    return {"target_host": msg.target_host, "reason": msg.reason, "params": dict(msg.params),
            "requested_by": requested_by, "placed": msg.target_host is None,
            "why": msg.why.model_dump(mode="json") if msg.why else None, "span": _current_span()}


def _current_span() -> list[str] | None:
    """The request's span (its handler's), which the migration's trace links to."""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return [format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")] if ctx.is_valid else None


class Requests:
    """The coordinator's request handling (mixed into ``CoordinatorService``)."""

    store: SagaStore
    hosts: HostRegistry
    fleet: CoordinatorFleet
    settled: Settled
    dispatcher: Dispatcher
    timeouts: SagaTimeouts
    owner: str
    cancels: dict[str, str]

    # provided by CoordinatorService
    @property
    def clock(self) -> Clock:
        raise NotImplementedError

    def _drive(self, rec: SagaRecord) -> None:
        raise NotImplementedError

    async def owner_of(self, vm_id: str) -> tuple[str, int] | None:
        raise NotImplementedError

    async def _send_status(self, event: MigrationStatusEvent) -> None:
        raise NotImplementedError

    async def on_migrate_request(self, msg: MigrateRequest, ctx: Context) -> Done | None:
        # without a client-chosen id, the message's own id: a redelivery is then the same request
        mid = msg.migration_id or _as_migration_id(ctx.message.message_id) or new_id()
        now = self.clock.now()
        existing = await self.store.get(mid)
        if existing is not None:
            if ctx.redelivered and existing.owner == self.owner and not existing.terminal:
                # the first delivery stored it and then lost its connection before it drove it
                self._drive(existing)
            return Done(detail={"migration_id": mid, "status": existing.status, "duplicate": True})
        queued = await self.store.queue.get(mid)
        if queued is not None:
            self.dispatcher.wake()
            return Done(detail={"migration_id": mid, "status": queued.state.value, "duplicate": True})
        located = self.hosts.locate(msg.vm_id)
        source = located[0] if located else ""
        verdict = self._judge(msg.vm_id, msg.target_host, located)
        note = None
        if verdict is not None and verdict[0] in AWAITED and await self._inventory_pending(msg.vm_id):
            verdict, source = None, ""  # queued without a source: awaiting inventory
            note = f"{verdict_text(msg.vm_id, msg.target_host, located)} yet; waiting for the hosts' inventories"
        candidates: tuple[str, ...] = (msg.target_host,) if msg.target_host else ()
        if verdict is None and msg.target_host is None and source:
            candidates, verdict = await self._place(msg.vm_id, located)
        if verdict is not None:
            code, reason = verdict
            await self._reject(mid, msg.vm_id, source, msg.target_host or "", code, reason,
                               SagaState(params=dict(msg.params), requested_by=ctx.sender, reason_requested=msg.reason))
            return Done(detail={"migration_id": mid, "status": "rejected", "code": code, "reason": reason})
        entry = new_entry(mid, msg.vm_id, source, candidates, priority=Priority.OPERATOR, now=now,
                          request=request_of(msg, ctx.sender), placement_note=note)
        stored, created = await self.store.queue.enqueue(entry)
        if not created:
            if stored.migration_id == mid:
                return Done(detail={"migration_id": mid, "status": stored.state.value, "duplicate": True})
            await self._already_migrating(mid, msg.vm_id, source, msg.target_host or "", stored.migration_id)
            return Done(detail={"migration_id": mid, "status": "rejected", "code": "already_migrating",
                                "running_migration_id": stored.migration_id})
        self.dispatcher.wake()
        return Done(detail={"migration_id": mid, "status": "queued"})

    def _judge(self, vm_id: str, target: str | None, located: Any) -> tuple[str, str] | None:
        if target is not None and not self.hosts.known(target):
            return "unknown_host", f"target host {target!r} is unknown"
        if located is None:
            return "unknown_vm", f"vm {vm_id!r} runs on no known host"
        if located[0] == target:
            return "same_host", f"vm {vm_id!r} already runs on {target!r}"
        return None

    async def _place(self, vm_id: str, located: Any) -> tuple[tuple[str, ...], tuple[str, str] | None]:
        """Placement's ranked targets for a request without one, or why none fits."""
        assert located is not None
        placement = await self.fleet.place(located[1], located[0], limit=CANDIDATES)
        if placement.fits:
            return placement.ranked, None
        return placement.ranked, ("no_placement", f"no host fits vm {vm_id}: {placement.explanation()}"[:MAX_STRING])

    # ---- requests awaiting inventory ----------------------------------------------------
    async def _inventory_pending(self, vm_id: str) -> bool:
        """Whether an inventory may still show ``vm_id``: the hosts' picture is not settled, or
        a migration of it ended within the settling window (a rolled-back guest is resumed on
        its source, which the next inventory shows)."""
        if not self.settled.settled():
            return True
        horizon = self.clock.now() - self.settled.window_s()
        return any(r.status != "rejected" and r.updated_at > horizon for r in await self.store.list(vm_id=vm_id, limit=5))

    async def refresh_queued(self, queued: list[QueueEntry]) -> None:
        """The dispatcher's ``refresh``: entries awaiting inventory are given their source (or
        rejected), then placement runs again for the placed ones."""
        rest = []
        for e in queued:
            if e.awaiting_inventory:
                await self._resolve(e)
            else:
                rest.append(e)
        await self.fleet.refresh(rest)

    async def _resolve(self, e: QueueEntry) -> None:
        req, now = e.request, self.clock.now()
        target: str | None = req.get("target_host")
        located = self.hosts.locate(e.vm_id)
        verdict = self._judge(e.vm_id, target, located)
        if (verdict is not None and verdict[0] in AWAITED and now < e.enqueued_at + self.timeouts.inventory_wait_s
                and await self._inventory_pending(e.vm_id)):
            return  # still waiting
        candidates: tuple[str, ...] = (target,) if target else ()
        if verdict is None and target is None:
            candidates, verdict = await self._place(e.vm_id, located)
        if verdict is not None:
            ended = await self.store.queue.cancel(e.migration_id, now=now)
            if ended is not None and ended.state is EntryState.CANCELLED:
                code, reason = verdict
                state = SagaState(params=dict(req.get("params") or {}), requested_by=req.get("requested_by"),
                                  reason_requested=req.get("reason"))
                await self._reject(e.migration_id, e.vm_id, located[0] if located else "", target or "", code,
                                   reason, state)
            return
        assert located is not None
        source = located[0]

        def located_at(x: QueueEntry) -> QueueEntry:
            if not x.awaiting_inventory:  # another replica got there first
                return x
            # the group stays (the SQL stores index it): such entries share one fair-share group
            return replace(x, source_host=source, candidates=candidates, placement_note=None)

        await self.store.queue.change_queued(e.migration_id, located_at)

    # ---- from a claimed entry to a saga ---------------------------------------------------
    async def start_entry(self, entry: QueueEntry) -> None:
        """Create and drive the saga of a claimed entry (the dispatcher's ``start``). The
        creation is idempotent by ``migration_id``: of two replicas starting one entry (a
        claim taken over), one creates the saga and drives it."""
        req = entry.request
        mid, now = entry.migration_id, self.clock.now()
        target = entry.target_host or ""
        state = SagaState(params=dict(req.get("params") or {}), requested_by=req.get("requested_by"),
                          reason_requested=req.get("reason"), why=req.get("why"), request_span=req.get("span"))
        located = self.hosts.locate(entry.vm_id)
        if located is None or located[0] != entry.source_host:
            where = f"now runs on {located[0]}" if located else "runs on no known host"
            await self._reject(mid, entry.vm_id, entry.source_host, target, "unknown_vm",
                               f"vm {entry.vm_id!r} {where}, not {entry.source_host!r}", state)
            return
        vm: VmSpec = located[1]
        state.vm = vm
        state.target_ready = self.hosts.ready_for(target, vm)
        owner = await self.owner_of(entry.vm_id)
        state.epoch = owner[1] if owner else 0
        policy = vm.params.get("migration")
        state.params = {**(dict(policy) if isinstance(policy, dict) else {}), **state.params}
        extra = state.model_extra if state.model_extra is not None else {}
        extra["queued_s"] = round(max(0.0, now - entry.enqueued_at), 3)
        extra["priority"] = entry.priority.name.lower()
        if req.get("placed", not req.get("target_host")):
            # a target that denies admission is replaced by the next one placement ranked
            extra["alternatives"] = [c for c in entry.candidates if c != target][: MAX_TARGETS - 1]
        record = SagaRecord(migration_id=mid, vm_id=entry.vm_id, source_host=entry.source_host, target_host=target,
                            created_at=now, updated_at=now, owner=self.owner, lease_until=now + self.timeouts.lease_s,
                            data=state.dump())
        stored, created = await self.store.create(record)
        if not created:
            if stored.migration_id != mid:  # a saga begun outside the queue holds the VM
                await self._already_migrating(mid, entry.vm_id, entry.source_host, target, stored.migration_id)
            return
        # driven before it is announced: an announcement lost with the connection must not
        # leave a stored saga that nobody drives until its lease runs out
        self._drive(stored)
        await self._status(stored.migration_id, stored.vm_id, "accepted", source=stored.source_host, target=target)

    async def announce_queued(self, d: Decision) -> None:
        """``migration.queued`` with what holds it (the dispatcher's ``announce``)."""
        e = d.entry
        assert d.reason is not None
        noted = (Reason.NO_CAPACITY, Reason.AWAITING_INVENTORY)
        reason = e.placement_note if d.reason in noted and e.placement_note else None
        await self._status(e.migration_id, e.vm_id, "queued", source=e.source_host, code=d.reason.value,
                           reason=reason or f"waiting: {d.reason.value.replace('_', ' ')}",
                           detail={"priority": e.priority.name.lower(), "candidates": list(e.candidates)})

    # ---- cancel -------------------------------------------------------------------------
    async def on_cancel(self, msg: MigrationCancel, ctx: Context) -> Done:
        mid = msg.migration_id
        entry = await self.store.queue.get(mid)
        if entry is not None and entry.state is EntryState.QUEUED:
            entry = await self.store.queue.cancel(mid, now=self.clock.now())
            if entry is not None and entry.state is EntryState.CANCELLED:
                # it never starts; the record keeps the id taken, so a repeated request is a duplicate
                await self._reject(mid, entry.vm_id, entry.source_host, entry.target_host or "", "cancelled",
                                   msg.reason, SagaState(requested_by=ctx.sender))
                self.dispatcher.wake()
                return Done(detail={"migration_id": mid, "cancel": "done", "status": "rejected"})
        rec = await self.store.request_cancel(mid)
        for _ in range(40):  # claimed a moment ago: its saga is being created
            if rec is not None or entry is None or entry.state is not EntryState.STARTED:
                break
            await asyncio.sleep(0.05)
            rec = await self.store.request_cancel(mid)
        if rec is None:
            raise InvalidMessage(f"no migration {mid!r}")
        if rec.terminal:
            raise Conflict(f"migration {mid} already ended {rec.status}")
        if SagaState.load(rec.data).switched:
            raise Conflict(f"migration {mid} is past the switch-over; it completes")
        self.cancels[mid] = msg.reason
        return Done(detail={"migration_id": mid, "cancel": "requested"})

    # ---- outcomes before a saga ---------------------------------------------------------------
    async def _reject(self, mid: str, vm_id: str, source: str, target: str, code: str, reason: str,
                      state: SagaState, running: str | None = None) -> None:
        """Store a rejection (terminal, so it frees the entry's slot if it held one) and tell followers."""
        now = self.clock.now()
        state.code, state.reason = code, reason
        if running is not None:
            extra = state.model_extra if state.model_extra is not None else {}
            extra["running_migration_id"] = running
        rec = SagaRecord(migration_id=mid, vm_id=vm_id, source_host=source, target_host=target, status="rejected",
                         step="request", created_at=now, updated_at=now, data=state.dump())
        _, created = await self.store.create(rec)
        if created:
            from . import observe

            observe.migration_rejected()
            await self._status(mid, vm_id, "rejected", source=source, target=target, reason=reason, code=code,
                               running=running)

    async def _already_migrating(self, mid: str, vm_id: str, source: str, target: str, running: str) -> None:
        reason = f"vm {vm_id} is already migrating ({running})"
        await self._reject(mid, vm_id, source, target, "already_migrating", reason, SagaState(), running=running)

    async def _status(self, mid: str, vm_id: str, status: str, *, source: str | None = None, target: str | None = None,
                      reason: str | None = None, code: str | None = None, running: str | None = None,
                      detail: dict[str, Any] | None = None, step: str = "request") -> None:
        event = MigrationStatusEvent(
            migration_id=mid, vm_id=vm_id, status=status, step=step,  # type: ignore[arg-type]
            source_host=source or None, target_host=target or None, reason=reason, code=code,
            running_migration_id=running, detail=detail or {}, at=self.clock.now(),
        )
        await self._send_status(event)

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
        await self._status(mid or new_id(), vm_id or "unknown", "rejected", reason=exc.reason[:MAX_STRING],
                           code="invalid_request")


def verdict_text(vm_id: str, target: str | None, located: Any) -> str:
    """What is not known yet of a request awaiting inventory."""
    if located is None:
        return f"vm {vm_id!r} runs on no host known"
    return f"target host {target!r} is not known"


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

