"""The coordinator's fleet: its FleetView (inventories, liveness, cordons) plus the slots the
store says are held, as placement and ``ferry hosts`` see it.

The view's overlay keeps conditions only (ready, cordoned, draining: a drain sets the last two
with ``view.cordon``); reservations and migrations in flight are read from the store's started
entries on each use, so every replica reckons with the same ones.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from ferry_common.messages.domain import VmSpec
from ferry_common.messages.public import HostInventory

from ..store import SagaStore
from .placement import Demand, Placement, place
from .queue import EntryState, QueueEntry
from .view import FleetView, HostView

Locate = Callable[[str], "tuple[str, VmSpec] | None"]


class CoordinatorFleet:
    def __init__(self, store: SagaStore, locate: Locate) -> None:
        self.store = store
        self.locate = locate
        self.view = FleetView()

    def update(self, inv: HostInventory) -> None:
        self.view.update(inv)

    def set_ready(self, host: str, ready: bool) -> None:
        self.view.set_ready(host, ready)

    async def started(self) -> list[QueueEntry]:
        return await self.store.queue.entries(states={EntryState.STARTED})

    def snapshot(self, started: Sequence[QueueEntry]) -> FleetView:
        """The view with the reservations of the migrations in flight (a copy: placement may
        run while sagas start and end)."""
        snap = FleetView(replace(h, reserved_mib=0, inbound=0, incoming_groups=Counter()) for h in self.view.values())
        for e in started:
            if e.target_host not in snap.hosts:
                continue
            located = self.locate(e.vm_id)
            vm = located[1] if located else None
            groups = vm.placement.anti_affinity if vm is not None and vm.placement is not None else ()
            snap.reserve(e.target_host, vm.memory_mib if vm else 0, groups)
        return snap

    async def place(self, vm: VmSpec, source: str, *, limit: int | None = None,
                    started: Sequence[QueueEntry] | None = None) -> Placement:
        snap = self.snapshot(await self.started() if started is None else started)
        return place(Demand.of(vm, source), snap.values(), limit=limit)

    async def refresh(self, queued: list[QueueEntry], *, limit: int = 5) -> None:
        """Place again the queued entries the coordinator placed (``request["placed"]``): the
        fleet moved since they were queued. The dispatcher's ``refresh``."""
        mine = [e for e in queued if e.request.get("placed")]
        if not mine:
            return
        started = await self.started()
        for e in mine:
            located = self.locate(e.vm_id)
            if located is None:
                continue
            p = await self.place(located[1], e.source_host, limit=limit, started=started)
            note = None if p.fits else p.explanation()
            if p.ranked != e.candidates or note != e.placement_note:
                await self.store.queue.update_queued(e.migration_id, candidates=p.ranked, placement_note=note)

    async def rows(self) -> list[dict[str, Any]]:
        """Each host for ``ferry hosts``: capacity, use, reservations, migrations in flight, labels, state."""
        started = await self.started()
        snap = self.snapshot(started)
        outbound = Counter(e.source_host for e in started)
        out = []
        for h in sorted(snap.values(), key=lambda h: h.name):
            out.append(_row(h, outbound[h.name]))
        return out


def _row(h: HostView, outbound: int) -> dict[str, Any]:
    return {"host": h.name, "driver": h.driver, "capacity_mib": h.capacity_mib, "used_mib": h.used_mib,
            "reserved_mib": h.reserved_mib, "free_mib": h.free_mib, "inbound": h.inbound, "outbound": outbound,
            "vms": h.vms, "labels": dict(h.labels), "state": h.condition.value}
