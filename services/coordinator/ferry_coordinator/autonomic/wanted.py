"""What policies and faults ask for: a VM moved (``MigrationWanted``), a host emptied
(``EvacuationWanted``, or a critical ``HostFaultEvent``). Each is acted on or only
recommended by the VM's automation level for its kind (fault, maintenance, load).

Acting on a VM queues its migration at the priority of its kind (a VM's own embot asking for
itself at operator priority; load moves last), with ids derived from the request's id: a
redelivery queues nothing more. Emptying a host is a drain (``fleet.drain_manager``, as
``ferry host drain``): at evacuation priority for a fault, drain priority for maintenance,
the VMs whose level only recommends left in place; its id is derived from the request's, and
a host has one drain at a time, so a redelivery or a second fault moves no VM twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ferry_common.endpoint import Context
from ferry_common.errors import InvalidMessage
from ferry_common.messages.commands import Done
from ferry_common.messages.drains import DrainRequest
from ferry_common.messages.host_events import HostFaultEvent
from ferry_common.messages.recommendations import (
    EvacuationWanted,
    MigrationWanted,
    MoveReason,
    ReasonKind,
    Recommendation,
)

from ..balance import inventory_version
from ..balance.recommendations import recommendation_id
from ..fleet.queue import Priority
from . import snapshot
from .ledger import Doc
from .moves import derived_id, enqueue_move

if TYPE_CHECKING:
    from .service import AutonomicService

PRIORITY: dict[ReasonKind, Priority] = {
    "fault": Priority.EVACUATION, "maintenance": Priority.DRAIN, "load": Priority.REBALANCE}
#: who the autonomic module's drains say requested them
REQUESTED_BY = "autonomic"


class Wanted:
    def __init__(self, service: AutonomicService) -> None:
        self.s = service

    async def on_fault(self, msg: HostFaultEvent, ctx: Context) -> None:
        """A critical fault evacuates the host (acted on or recommended per VM's level); one
        whose ``detail.resolved`` is true gives the host back to the balancer (and uncordons
        it, once the evacuation this module started there has ended); the rest are for the
        host's own policies to weigh."""
        if msg.detail.get("resolved") is True:
            def clear(doc: Doc) -> None:
                doc.body.get("faulty", {}).pop(msg.host, None)
            await self.s.change(clear)
            drain = await self.s.c.store.drains.latest(msg.host)
            if drain is not None and drain.cordoned and not drain.active and \
                    (drain.requested_by or "").startswith(REQUESTED_BY):
                await self.s.c.drains.uncordon(msg.host, return_vms=False)
            self.s.poke()
        elif msg.severity == "critical":
            await self.evacuate(msg.host, "fault", f"host.fault.{msg.kind}", msg.id, msg.message or msg.kind)
        return None

    async def on_evacuation_wanted(self, msg: EvacuationWanted, ctx: Context) -> Done:
        drain_id, queued, recommended = await self.evacuate(msg.host, msg.kind, msg.policy, msg.id, msg.detail)
        return Done(detail={"drain_id": drain_id, "queued": queued, "recommended": recommended})

    async def evacuate(self, host: str, kind: ReasonKind, policy: str, source_id: str,
                       detail: str) -> tuple[str, list[str], list[str]]:
        """Drain ``host`` of the VMs whose level acts on ``kind``; recommend moving the others.
        Returns the drain's id (the one already running there, if any), and the VMs of each."""
        s = self.s

        def cordon(doc: Doc) -> None:
            doc.body.setdefault("faulty", {})[host] = kind
        await s.change(cordon)  # the balancer sends nothing there from now on
        doc = await s.ledger.read()
        snap = await s.read_snapshot(doc)
        levels = s.policy(doc, snap)
        version = inventory_version(snap.fleet)
        whys: dict[str, MoveReason] = {}
        leave: dict[str, str] = {}
        recs: list[Recommendation] = []
        now = s.clock.now()
        for vm_id in sorted(s.c.hosts.placement().get(host, [])):
            spec = snap.specs.get(vm_id)
            if spec is None:
                continue
            targets, _ = snapshot.ranked_targets(spec, host, snap.view.values())
            level = levels.level_for(vm_id)
            why = MoveReason(kind=kind, policy=policy, level=level, detail=detail[:200],
                             figures={"targets": float(len(targets))})
            if levels.decide(vm_id, kind) == "act":
                whys[vm_id] = why
                continue
            leave[vm_id] = f"automation level {level}: a {kind} move is only recommended"
            if targets:
                recs.append(Recommendation(id=recommendation_id(version, vm_id, host, targets[0]), vm_id=vm_id,
                                           source_host=host, target_host=targets[0], reason=why,
                                           inventory_version=version, created_at=now))
        request = DrainRequest(
            host=host, drain_id=derived_id("evac", source_id), reason=detail[:200], leave=leave,
            priority="evacuation" if kind == "fault" else "drain",
            why=MoveReason(kind=kind, policy=policy, level=levels.cluster, detail=detail[:200]),
        )
        assert request.drain_id is not None
        status = await s.c.drains.request(request, request.drain_id, f"{REQUESTED_BY} ({policy})", whys)
        await self.recommend(recs)
        s.poke()
        return getattr(status, "drain_id", request.drain_id), sorted(whys), [r.vm_id for r in recs]

    async def on_migration_wanted(self, msg: MigrationWanted, ctx: Context) -> Done:
        s = self.s
        located = s.c.hosts.locate(msg.vm_id)
        if located is None:
            raise InvalidMessage(f"vm {msg.vm_id!r} runs on no known host")
        source, spec = located
        doc = await s.ledger.read()
        snap = await s.read_snapshot(doc)
        if msg.target_host is not None:
            targets: tuple[str, ...] = (msg.target_host,)
            note = None
        else:
            targets, note = snapshot.ranked_targets(spec, source, snap.view.values())
        levels = s.policy(doc, snap)
        level = levels.level_for(msg.vm_id)
        why = MoveReason(kind=msg.kind, policy=msg.policy, level=level, figures=dict(msg.figures),
                         detail=(f"{msg.embot_id}: " if msg.embot_id else "") + msg.detail[:200])
        if msg.act and levels.decide(msg.vm_id, msg.kind) == "act":
            priority = Priority.OPERATOR if msg.own else PRIORITY[msg.kind]
            mid = derived_id("want", msg.id)
            entry, created = await enqueue_move(s.c.store, mid, msg.vm_id, source, targets, priority=priority,
                                                group=f"policy:{source}", why=why, now=s.clock.now(), note=note)
            return Done(detail={"migration_id": entry.migration_id, "queued": created})
        if not targets:
            return Done(detail={"recommended": False, "reason": note or "no host fits"})
        version = inventory_version(snap.fleet)
        rec = Recommendation(id=recommendation_id(version, msg.vm_id, source, targets[0]), vm_id=msg.vm_id,
                             source_host=source, target_host=targets[0], reason=why, inventory_version=version,
                             created_at=s.clock.now())
        await self.recommend([rec])
        return Done(detail={"recommendation_id": rec.id})

    async def recommend(self, recs: list[Recommendation]) -> None:
        if not recs:
            return
        s = self.s
        events: list = []

        def offer(doc: Doc) -> None:
            book = s.book(doc)
            events[:] = book.offer(recs)
            doc.body["recommendations"] = [r.model_dump(mode="json") for r in book.current()]
        await s.change(offer)
        await s.publish(events)
