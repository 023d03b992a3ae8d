"""The drain manager: what every coordinator replica runs to carry drains to their end.

All its state is in the store (``store.drains`` and the fleet queue); a pass reads each drain
that still has work, brings its VMs up to date from their queue entries and saga records,
asks for the next migrations and saves it under its version. Two replicas passing at once
compute the same thing: one save wins, the other's is refused and retried on its next pass,
and the migrations both asked for have the same deterministic ids, which the queue takes once.
So a drain survives its coordinator dying at any moment; nothing is asked for twice.

A drain's migrations are queue entries (priority DRAIN, or EVACUATION for a failing host;
group = the drain id, ``request`` = the MigrateRequest body, with the drain's ``why``); the
fleet dispatcher starts them as limits allow. A drain pre-empts automatic work: queued
rebalancing moves off its host or onto it are cancelled before its own are queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

from ferry_common.aio import one_pass
from ferry_common.bus.topology import drain_status
from ferry_common.clock import Clock
from ferry_common.errors import Conflict, FerryError, InvalidMessage
from ferry_common.messages.base import Wire
from ferry_common.messages.drains import DrainPlan, DrainRequest, DrainStatusEvent, DrainVmPlan
from ferry_common.messages.limits import MAX_STRING
from ferry_common.messages.recommendations import MoveReason

from ..hosts import HostRegistry
from ..saga.state import SagaState
from ..store.base import SagaStore
from . import metrics
from .drain import VM_ENDS, Drain, DrainState, DrainVm, VmState, migration_id
from .drain_planner import plan_drain
from .drain_trace import migration_roots, record_drain_trace
from .queue import EntryState, Priority, QueueEntry, new_entry
from .settled import Settled
from .view import FleetView

log = logging.getLogger(__name__)
Publish = Callable[[str, Wire], Awaitable[None]]


class DrainManager:
    def __init__(
        self,
        store: SagaStore,
        hosts: HostRegistry,
        clock: Clock,
        publish: Publish,
        *,
        ready: Callable[[], dict[str, bool]] = dict,
        on_abort: Callable[[str, str], None] = lambda mid, reason: None,
        interval_s: float = 0.2,
        warmup_s: float = 3.0,
        settled: Settled | None = None,
    ) -> None:
        self.store = store
        self.hosts = hosts
        self.clock = clock
        self.publish = publish
        self.ready = ready
        self.on_abort = on_abort
        self.interval_s = interval_s
        self.settled = settled  # whether "no host lists it" or a stale listing can be believed
        self._told: dict[str, tuple[Any, ...]] = {}  # drain id -> the last status published here
        self._candidates: dict[str, tuple[str, ...]] = {}  # migration id -> ranked targets, until enqueued
        # a replica that just started has not heard every host yet: placing then would call
        # VMs unmovable that are not; after one liveness bound every ready host has reported
        self.warmup_s = warmup_s
        self._warm = asyncio.Event()

    # ---- what placement sees -----------------------------------------------------------
    async def view(self) -> FleetView:
        view = FleetView.from_inventories(self.hosts.hosts.values())
        for host in await self.store.drains.cordoned():
            if host in view.hosts:
                view.cordon(host)
        for drain in await self.store.drains.list(active=True):
            if drain.host in view.hosts:
                view.cordon(drain.host, draining=True)
        for host, ok in self.ready().items():
            view.set_ready(host, ok)
        return view

    async def cordoned(self) -> set[str]:
        """The hosts placement skips because of drains: cordoned, or being drained."""
        return await self.store.drains.cordoned() | {d.host for d in await self.store.drains.list(active=True)}

    async def parallel(self) -> int:
        limits = await self.store.queue.limits()
        return max(1, min(limits.outbound_per_host, limits.cluster))

    # ---- requests ----------------------------------------------------------------------
    async def plan(self, host: str, leave: Mapping[str, str] | None = None) -> DrainPlan:
        """What draining ``host`` would do; the VMs of ``leave`` stay, named unmovable with why."""
        leave = leave or {}
        vms = [spec for vm_id in self.hosts.placement().get(host, [])
               if vm_id not in leave and (loc := self.hosts.locate(vm_id)) and (spec := loc[1])]
        parallel = await self.parallel()
        movable, stuck = plan_drain(host, vms, await self.view(), parallel=parallel)
        staying = [DrainVmPlan(vm_id=v, reason=why[:MAX_STRING]) for v, why in sorted(leave.items())
                   if v in self.hosts.placement().get(host, [])]
        return DrainPlan(
            host=host,
            vms=[DrainVmPlan(vm_id=p.vm_id, target=p.target, order=p.order, estimate_s=round(p.estimate_s, 3)) for p in movable],
            unmovable=[DrainVmPlan(vm_id=p.vm_id, reason=(p.reason or "")[:MAX_STRING]) for p in stuck] + staying,
            estimate_s=round(max((p.estimate_s for p in movable), default=0.0), 3),
            parallel=parallel,
        )

    async def request(self, msg: DrainRequest, drain_id: str, requested_by: str | None,
                      whys: Mapping[str, MoveReason] | None = None) -> Wire:
        """Start draining ``msg.host`` (or answer the drain already running there).
        ``whys``: a VM's own reason, for the VMs whose differs from ``msg.why`` (the balancer
        records the automation level each VM moved at)."""
        await self._warm.wait()
        if not self.hosts.known(msg.host):
            raise InvalidMessage(f"host {msg.host!r} is unknown")
        plan = await self.plan(msg.host, msg.leave)
        if msg.dry_run:
            return plan
        now = self.clock.now()
        whys = whys or {}
        vms = {p.vm_id: DrainVm(p.vm_id, why=_dump(whys.get(p.vm_id))) for p in plan.vms}
        for p in plan.unmovable:  # named at once; placement may still find room later for none of them
            vms[p.vm_id] = DrainVm(p.vm_id, state=VmState.UNMOVABLE, reason=p.reason, ended_at=now)
        drain = Drain(
            drain_id=drain_id, host=msg.host, created_at=now, updated_at=now,
            deadline_at=None if msg.deadline_s is None else now + msg.deadline_s,
            on_unmovable=msg.on_unmovable, max_attempts=msg.max_attempts, requested_by=requested_by, vms=vms,
            priority=int(Priority.EVACUATION if msg.priority == "evacuation" else Priority.DRAIN),
            why=_dump(msg.why), left=sorted(v for v in msg.leave if v in vms),
        )
        stored, _ = await self.store.drains.create(drain)
        with contextlib.suppress(Conflict):  # a pass got there first
            await self.advance(stored)
        return await self.status(msg.host)

    async def status(self, host: str) -> DrainStatusEvent:
        drain = await self.store.drains.latest(host)
        if drain is None:
            raise InvalidMessage(f"host {host!r} has never been drained")
        return self.event(drain, await self.parallel())

    async def cancel(self, host: str, *, abort: bool) -> DrainStatusEvent:
        drain = await self.store.drains.latest(host)
        if drain is None:
            raise InvalidMessage(f"host {host!r} has no drain")
        reason = "cancelled by operator" + (" (aborting migrations in flight)" if abort else "")
        ended = await self.store.drains.cancel(drain.drain_id, now=self.clock.now(), reason=reason)
        assert ended is not None
        if abort:
            for vm in ended.vms.values():
                if vm.state not in VM_ENDS and vm.migration_id is not None:
                    await self.store.request_cancel(vm.migration_id)
                    self.on_abort(vm.migration_id, reason)
        with contextlib.suppress(Conflict):
            await self.advance(ended)
        return await self.status(host)

    async def uncordon(self, host: str, *, return_vms: bool) -> DrainStatusEvent:
        """Placement may choose ``host`` again; with ``return_vms`` the VMs its last drain moved
        away are queued to come back (ids derived from the drain: asking twice is asking once)."""
        drain = await self._uncordoned(host, return_vms)
        if return_vms:
            now = self.clock.now()
            for vm_id, at in drain.moved().items():
                mid = f"undrain.{drain.drain_id}.{vm_id}"
                request = {"vm_id": vm_id, "target_host": host, "migration_id": mid, "reason": f"undrain of {host}"}
                await self.store.queue.enqueue(new_entry(
                    mid, vm_id, at, (host,), priority=Priority.OPERATOR, group=f"undrain.{drain.drain_id}",
                    now=now, request=request,
                ))
        return self.event(drain, await self.parallel())

    async def _uncordoned(self, host: str, return_vms: bool) -> Drain:
        for _ in range(10):  # a pass of another replica may save the drain in between: read again
            drain = await self.store.drains.latest(host)
            if drain is None:
                raise InvalidMessage(f"host {host!r} has no drain")
            if drain.active:
                raise Conflict(f"host {host} is draining ({drain.drain_id}); cancel the drain first")
            with contextlib.suppress(Conflict):
                return await self.store.drains.save(replace(drain, cordoned=False, returned=drain.returned or return_vms))
        raise Conflict(f"the drain of {host} keeps changing; try again")

    # ---- the passes --------------------------------------------------------------------
    async def run(self) -> None:
        started = self.clock.monotonic()
        while not self._warm.is_set():  # until every host had time for one inventory
            periods = [inv.period_s or 0.0 for inv in self.hosts.hosts.values()]
            need = max(self.warmup_s, 1.5 * max(periods, default=0.0))
            if periods and self.clock.monotonic() - started >= need:
                self._warm.set()
            else:
                await self.clock.sleep(0.1)
        while True:
            await one_pass(self.tick, log, "drain pass")
            await self.clock.sleep(self.interval_s)

    async def tick(self) -> None:
        for drain in await self.store.drains.open():
            with contextlib.suppress(Conflict):  # another replica saved it first: next pass
                await self.advance(drain)

    async def advance(self, drain: Drain) -> Drain:
        """Bring ``drain`` up to date, ask for its next migrations, end it when every VM has."""
        now = self.clock.now()
        before = drain.to_dict()
        view: FleetView | None = None
        to_enqueue: list[DrainVm] = []
        if drain.active and self.hosts.known(drain.host):
            # a VM that arrived after the plan (its migration here was in flight when the drain
            # began, e.g. another drain's) leaves too: a drained host keeps none
            for vm_id in self.hosts.placement().get(drain.host, []):
                drain.vms.setdefault(vm_id, DrainVm(vm_id))
        for vm in drain.vms.values():
            if vm.state in VM_ENDS:
                continue
            if vm.state in (VmState.QUEUED, VmState.IN_FLIGHT):
                queued = await self._follow(drain, vm, now)
                if queued is not None and drain.active:
                    if view is None:
                        view = await self.view()
                    await self._refresh(drain, vm, queued, view)
            if vm.state is VmState.PENDING:
                if not drain.active:
                    vm.state, vm.ended_at = VmState.CANCELLED, now
                    continue
                if view is None:
                    view = await self.view()
                self._place(drain, vm, view, now, to_enqueue)
        if drain.active and drain.deadline_at is not None and now >= drain.deadline_at and not drain.finished_vms():
            left = sorted(v.vm_id for v in drain.vms.values() if v.state not in VM_ENDS)
            # a deadline is a failure, not a cancel: queued ones cancelled, those in flight finish
            ended = await self.store.drains.cancel(drain.drain_id, now=now, state=DrainState.FAILED,
                                                   reason="deadline passed; still there: " + ", ".join(left))
            if ended is not None:
                drain, before, to_enqueue = ended, ended.to_dict(), []
        # and not while a migration into the host is still in flight: its VM would stay
        ending = drain.active and drain.finished_vms() and not any(
            e.target_host == drain.host for e in await self.store.queue.entries(states={EntryState.STARTED}))
        if ending:
            state, reason = drain.outcome()
            drain = drain.to(state, now=now, reason=reason)
            drain.trace_links = await migration_roots(self.store, drain)
        if drain.to_dict() != before:
            drain.updated_at = now
            try:
                drain = await self.store.drains.save(drain)
            except Conflict:
                for vm in to_enqueue:
                    self._candidates.pop(vm.migration_id or "", None)
                raise
            if ending:  # only the replica whose save ended it records the drain's span
                record_drain_trace(drain)
        if to_enqueue and drain.active:
            await self._preempt(drain, now)
        for vm in to_enqueue:  # after the save: a replica that dies here is redone by the next pass
            assert vm.migration_id is not None
            await self.store.drains.enqueue(drain.drain_id, new_entry(
                vm.migration_id, vm.vm_id, drain.host, self._candidates.pop(vm.migration_id, ()),
                priority=Priority(drain.priority), group=drain.drain_id, now=now, request=_request(drain, vm),
            ))
        await self._announce(drain)
        return drain

    async def _preempt(self, drain: Drain, now: float) -> None:
        """Cancel the queued automatic moves off ``drain.host`` or onto it: the drain goes
        first, and the balancer plans again around the cordon (those started finish)."""
        for e in await self.store.queue.entries(states=(EntryState.QUEUED,)):
            if e.priority is Priority.REBALANCE and (e.source_host == drain.host or drain.host in e.candidates):
                await self.store.queue.cancel(e.migration_id, now=now)
                log.info("drain %s pre-empts %s (%s)", drain.drain_id, e.migration_id, e.vm_id)

    def _place(self, drain: Drain, vm: DrainVm, view: FleetView, now: float, out: list[DrainVm]) -> None:
        if self.settled is not None and vm.ended_at is not None and now - vm.ended_at < self.settled.window_s():
            return  # its last attempt just rolled back: judge by inventories sent after it
        located = self.hosts.locate(vm.vm_id)
        if located is None and not self.hosts.known(drain.host):
            return  # the host's inventory has not arrived here yet: next pass
        inv = self.hosts.hosts.get(drain.host)
        here = next((v for v in inv.vms if v.vm_id == vm.vm_id), None) if inv is not None else None
        hint = self.hosts.moved.get(vm.vm_id)
        if here is not None and (hint is None or hint[0] == drain.host):
            # the host still runs it and no saga moved it: after a rollback the target may list
            # it a while longer, and locate could name the target, calling the VM gone
            located = (drain.host, here)
        moved = located is not None and hint is not None and hint[0] == located[0]  # a saga's word
        if (located is None or located[0] != drain.host) and not moved and self.settled is not None \
                and not self.settled.settled():
            return  # a host silent or just back (the broker away, say): its listing may be stale
        if located is None or located[0] != drain.host:
            # it left (or is gone) by other means: nothing for the drain to do
            vm.state, vm.ended_at, vm.target = VmState.DONE, now, located[0] if located else None
            vm.reason = None if located else "no longer on any host"
            return
        movable, stuck = plan_drain(drain.host, [located[1]], view, parallel=1, exclude={vm.vm_id: vm.tried})
        if stuck and not any(h.ready for name, h in view.hosts.items() if name != drain.host):
            return  # every other host silent (the broker away, say): nothing to judge by yet, next pass
        if stuck:
            vm.state, vm.ended_at, vm.reason = (VmState.UNMOVABLE if not vm.tried else VmState.FAILED), now, stuck[0].reason
            return
        target = movable[0]
        view.reserve(target.target or "", target.memory_mib)  # the next VM of this pass sees it
        vm.attempt += 1
        vm.memory_mib = target.memory_mib
        vm.migration_id = migration_id(drain.drain_id, vm.vm_id, vm.attempt)
        vm.state, vm.target, vm.started_at = VmState.QUEUED, target.target, now
        self._candidates[vm.migration_id] = target.candidates
        out.append(vm)

    async def _refresh(self, drain: Drain, vm: DrainVm, entry: QueueEntry, view: FleetView) -> None:
        """A queued entry's targets, again, if one of them was cordoned or drained since, or
        if it has none (no host was ready when it was placed: a replica's first pass, before
        the inventories came in, or the broker down); else it would wait for ever."""
        if entry.candidates and all(view.hosts[h].schedulable for h in entry.candidates if h in view.hosts):
            return
        located = self.hosts.locate(vm.vm_id)
        if located is None:
            return
        movable, stuck = plan_drain(drain.host, [located[1]], view, parallel=1, exclude={vm.vm_id: vm.tried})
        ranked = movable[0].candidates if movable else ()
        await self.store.queue.update_queued(entry.migration_id, candidates=ranked,
                                             placement_note=stuck[0].reason if stuck else None)
        if movable:
            vm.target = movable[0].target

    async def _follow(self, drain: Drain, vm: DrainVm, now: float) -> QueueEntry | None:
        """Bring ``vm`` up to date; its queue entry if it is still queued."""
        assert vm.migration_id is not None
        rec = await self.store.get(vm.migration_id)
        if rec is not None and rec.terminal:
            vm.ended_at = now
            if rec.status == "completed":
                vm.state, vm.target = VmState.DONE, rec.target_host
                drain.durations.append(max(0.0, rec.updated_at - rec.created_at))
                return None
            state = SagaState.load(rec.data)
            vm.reason = f"{rec.status}: {state.code or ''} {state.reason or ''}".strip()[:MAX_STRING]
            if rec.target_host and rec.target_host not in vm.tried:
                vm.tried.append(rec.target_host)
            if not drain.active:
                vm.state = VmState.CANCELLED
            elif vm.attempt < drain.max_attempts:
                vm.state = VmState.PENDING  # again, on another host
            else:
                vm.state = VmState.FAILED
            return None
        if rec is not None:
            vm.state = VmState.IN_FLIGHT
            return None
        entry = await self.store.queue.get(vm.migration_id)
        if entry is None:
            located = self.hosts.locate(vm.vm_id)
            if located is not None and located[0] != drain.host:
                # never queued under this id (another move of the VM was live), and that one took it away
                vm.state, vm.ended_at, vm.target = VmState.DONE, now, located[0]
            elif drain.active:  # saved as queued, then its replica died before enqueueing it
                await self.store.drains.enqueue(drain.drain_id, new_entry(
                    vm.migration_id, vm.vm_id, drain.host, (vm.target,) if vm.target else (),
                    priority=Priority(drain.priority), group=drain.drain_id, now=now, request=_request(drain, vm),
                ))
            else:
                vm.state, vm.ended_at = VmState.CANCELLED, now
        elif entry.state is EntryState.CANCELLED:
            vm.state, vm.ended_at = VmState.CANCELLED, now
        elif entry.state is EntryState.STARTED:
            vm.state = VmState.IN_FLIGHT
        elif entry.state is EntryState.QUEUED:
            return entry
        elif entry.state is EntryState.DONE:  # released without a saga: that attempt is over
            vm.tried.append(entry.target_host or "")
            vm.state = VmState.PENDING if drain.active and vm.attempt < drain.max_attempts else VmState.FAILED
        return None

    # ---- what followers see ------------------------------------------------------------
    def event(self, drain: Drain, parallel: int) -> DrainStatusEvent:
        c = drain.counts()
        return DrainStatusEvent(
            drain_id=drain.drain_id, host=drain.host, status=drain.state.value,  # type: ignore[arg-type]
            total=c["total"], done=c["done"], failed=c["failed"], in_flight=c["in_flight"], queued=c["queued"],
            unmovable=c["unmovable"], eta_s=drain.eta_s(parallel) if drain.active else 0.0,
            failed_vms=sorted(v.vm_id for v in drain.vms.values() if v.state is VmState.FAILED),
            unmovable_vms={v.vm_id: (v.reason or "")[:MAX_STRING] for v in drain.vms.values() if v.state is VmState.UNMOVABLE},
            remaining_vms=sorted(v.vm_id for v in drain.vms.values() if v.state is not VmState.DONE),
            reason=(drain.reason or None) and drain.reason[:MAX_STRING],
            priority="evacuation" if drain.priority >= Priority.EVACUATION else "drain",
            why=MoveReason.model_validate(drain.why) if drain.why else None,
            at=self.clock.now(),
        )

    async def _announce(self, drain: Drain) -> None:
        counts = drain.counts()
        metrics.observe_drain(drain.host, counts if drain.active else {**counts, "in_flight": 0, "queued": 0})
        key = (drain.state, tuple(sorted(counts.items())))
        if self._told.get(drain.drain_id) == key:
            return
        self._told[drain.drain_id] = key
        event = self.event(drain, await self.parallel())
        with contextlib.suppress(FerryError, asyncio.TimeoutError):
            await self.publish(drain_status(drain.host, drain.state.value), event)


def _dump(why: MoveReason | None) -> dict[str, Any] | None:
    return why.model_dump(mode="json") if why is not None else None


def _request(drain: Drain, vm: DrainVm) -> dict[str, Any]:
    """The MigrateRequest body of ``vm``'s current attempt (its ``why`` lands on the saga's record)."""
    request: dict[str, Any] = {"vm_id": vm.vm_id, "target_host": vm.target, "migration_id": vm.migration_id,
                               "reason": f"drain of {drain.host} ({drain.drain_id})"}
    why = vm.why or drain.why
    if why:
        request["why"] = why
    return request
