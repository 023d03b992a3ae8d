"""The managed-object service: the registry of a host's managed elements and embots.

It runs the embots' policies on the events the sensor dispatches, serializes a VM's
plane for migration, tracks what changes while the VM migrates (dirty elements and
embots), and stages, checks and activates a plane that arrives from another host.
"""

from __future__ import annotations

import logging
from typing import Any

from ferry_common.bus.topology import host_event, host_load
from ferry_common.endpoint import Context, Endpoint
from ferry_common.errors import Conflict, InvalidMessage
from ferry_common.messages.commands import (
    CleanupSource,
    CleanupTarget,
    DispatchEvents,
    Done,
    ExportDirtyObjects,
    ExportManagementState,
    FetchModules,
    Inspect,
    Inspection,
    InstallModules,
    ManagementState,
    MigrationComplete,
    MigrationState,
    RegisterManagementGraph,
    ReleaseVm,
    SetAttributes,
    SourceTeardown,
)
from ferry_common.messages.domain import Element, Embot, Module
from ferry_common.messages.host_events import HostFaultEvent, HostLoad
from ferry_common.messages.planes import ApplyPlane, GetPlane
from ferry_common.security import host_identity
from ferry_common.service import HostService
from ferry_common.state import StateStore

from .host_plane import HostFeed
from .migration_source import MigrationSource
from .migration_target import MigrationTarget
from .modules import ModuleError, ModuleRegistry
from .outbox import Outbox
from .plane import GraphError, TypeResolutionError, VmPlane, apply_event, check_graph
from .plane_files import PlaneFiles
from .policy import Effect, PolicyEngine

log = logging.getLogger(__name__)
# the audit trail kept per VM and host (FERRY_LEDGER_MAX): enough to verify a migration's
# events were each dispatched once; an event id is ~32 bytes, so 10k ids cost ~1 MB per VM
LEDGER_MAX = 10_000


class ManagedObjectService(HostService):
    service = "managed_object"

    def __init__(self, host: str, endpoint: Endpoint, state: StateStore | None = None, *,
                 ledger_max: int = LEDGER_MAX) -> None:
        super().__init__(host, endpoint, state)
        self.modules = ModuleRegistry()
        self.engine = PolicyEngine()
        self.planes: dict[str, VmPlane] = {}
        # what was dispatched here, per VM, kept after the VM leaves: the audit trail of the
        # newest ``ledger_max`` events per VM (a host dispatches for months: it must not grow
        # without bound, in memory or in the state store)
        self.ledger: dict[str, list[str]] = {}
        self.ledger_max = ledger_max
        self._ledger_next: dict[str, int] = {}  # per VM, the sequence number of the next entry
        self._ledger_low: dict[str, int] = {}  # per VM, the oldest sequence number still stored
        # what the policies asked to send, kept until it is out (ferry_managed_object.outbox)
        self.outbox = Outbox(host, endpoint, self.state)
        self.policy_errors = 0
        r = self.router
        r.add(RegisterManagementGraph, self.on_register)
        r.add(ReleaseVm, self.on_release)
        r.add(InstallModules, self.on_install)
        r.add(DispatchEvents, self.on_dispatch)
        r.add(SetAttributes, self.on_set_attributes)
        # a VM's plane as a document (ferry plane apply/get)
        self.plane_files = PlaneFiles(self)
        r.add(ApplyPlane, self.plane_files.on_apply)
        r.add(GetPlane, self.plane_files.on_get)
        r.add(Inspect, self.on_inspect)
        # the migration's steps, as its source and as its target
        self.source = source = MigrationSource(self)
        self.target = target = MigrationTarget(self)
        r.add(FetchModules, source.on_fetch_modules)
        r.add(ExportManagementState, source.on_export)
        r.add(ExportDirtyObjects, source.on_export_dirty)
        self.step(SourceTeardown, source.on_teardown)
        self.step(CleanupSource, source.on_cleanup_source)
        r.add(ManagementState, target.on_state)  # not memoised: ModulesRequired is answered again
        self.step(MigrationState, target.on_migration_state)
        # not memoised: activating is idempotent itself, and a replay is passed on again
        r.add(MigrationComplete, target.on_complete)
        self.step(CleanupTarget, target.on_cleanup_target)
        # the host's own plane, fed by its telemetry (ferry_managed_object.host_plane)
        self.host_feed = HostFeed(self)
        r.route_key(host_load(host), HostLoad)
        r.route_key(host_event(host), HostFaultEvent)
        r.add(HostLoad, self.host_feed.on_load)
        r.add(HostFaultEvent, self.host_feed.on_fault)

    def bindings(self) -> tuple[str, ...]:
        return (*super().bindings(), host_load(self.host), host_event(self.host))

    def dispatched_count(self, vm_id: str) -> int:
        """How many of ``vm_id``'s events this host has dispatched, ever (the ledger keeps
        only the newest ``ledger_max`` of their ids)."""
        return self._ledger_next.get(vm_id, 0)

    # ---- durable state: planes, modules, the dedup window and the ledger ----------------
    async def restore(self) -> None:
        await self.target.restore()
        for _, raw in await self.state.items("modules"):
            self.modules.install(Module.model_validate(raw))
        for vm_id, meta in await self.state.items("plane"):
            elements = [Element.model_validate(v) for _, v in await self.state.items(f"el.{vm_id}")]
            embots = [Embot.model_validate(v) for _, v in await self.state.items(f"eb.{vm_id}")]
            rows = await self.state.items(f"recent.{vm_id}")
            recent = [v for _, v in rows]
            self.planes[vm_id] = VmPlane.restore(vm_id, meta, elements, embots, recent,
                                                 int(rows[-1][0]) + 1 if rows else 0)
        for key in {k for k, _ in await self.state.items("ledgers")}:
            rows = await self.state.items(f"ledger.{key}")
            self.ledger[key] = [v for _, v in rows][-self.ledger_max:]
            self._ledger_next[key] = int(rows[-1][0]) + 1 if rows else 0
            self._ledger_low[key] = int(rows[0][0]) if rows else 0
            await self.outbox.restore(key)

    async def start(self) -> None:
        await super().start()
        await self.outbox.send_all()  # what a crash left between the write and the sends

    async def _save_modules(self, modules: list[Module]) -> None:
        await self.state.put_many("modules", [(f"{m.name}@{m.version}", m.model_dump(mode="json")) for m in modules])

    async def _save_meta(self, plane: VmPlane) -> None:
        await self.state.put("plane", plane.vm_id, plane.meta())

    async def _save_plane(self, plane: VmPlane) -> None:
        vm = plane.vm_id
        await self.state.clear(f"el.{vm}")
        await self.state.clear(f"eb.{vm}")
        await self.state.put_many(f"el.{vm}", [(e.id, e.model_dump(mode="json")) for e in plane.elements.values()])
        await self._save_embots(plane, list(plane.embots))
        await self.state.clear(f"recent.{vm}")
        await self.state.put_many(f"recent.{vm}", plane.recent_rows(len(plane.recent)))
        plane.recent_trimmed = False
        await self._save_meta(plane)

    async def _drop_stale_recent(self, plane: VmPlane) -> None:
        """After new ids were stored: the rows of ids the window let go of, if it did."""
        if plane.recent_trimmed:
            plane.recent_trimmed = False
            await self.state.delete_through(f"recent.{plane.vm_id}", plane.recent_stale_key())

    async def _save_embots(self, plane: VmPlane, ids: list[str]) -> None:
        await self.state.put_many(f"eb.{plane.vm_id}", [(i, plane.embot(i).model_dump(mode="json")) for i in ids])

    async def _drop_plane(self, vm_id: str) -> None:
        await self.state.delete("plane", vm_id)
        await self.state.clear(f"el.{vm_id}")
        await self.state.clear(f"eb.{vm_id}")
        await self.state.clear(f"recent.{vm_id}")

    # ---- administration -----------------------------------------------------------
    async def on_install(self, msg: InstallModules, ctx: Context) -> Done:
        try:
            refs = [self.modules.install(m) for m in msg.modules]
        except ModuleError as exc:
            raise InvalidMessage(str(exc)) from None
        await self._save_modules(msg.modules)
        return Done(detail={"installed": [r.key for r in refs]})

    async def on_register(self, msg: RegisterManagementGraph, ctx: Context) -> Done:
        graph = msg.graph
        if graph.vm_id in self.planes:
            raise Conflict(f"vm {graph.vm_id!r} already has a management plane on {self.host!r}")
        try:
            for m in msg.modules:
                self.modules.install(m)
            resolution = self.modules.resolve(graph.manifest)
            if resolution.missing:
                raise TypeResolutionError("unknown modules: " + ", ".join(r.key for r in resolution.missing))
            check_graph(graph, self.modules, self.engine)
        except (ModuleError, GraphError, TypeResolutionError) as exc:
            raise InvalidMessage(str(exc)) from None
        self.planes[graph.vm_id] = VmPlane.from_graph(graph, "active")
        self.ledger.setdefault(graph.vm_id, [])
        await self._save_modules(msg.modules)
        await self._save_plane(self.planes[graph.vm_id])
        return Done(detail={"elements": len(graph.elements), "embots": len(graph.embots)})

    async def on_release(self, msg: ReleaseVm, ctx: Context) -> Done:
        """The VM is given back to its operator: its plane goes (the ledger stays, for audit)."""
        plane = self.planes.get(msg.vm_id)
        if plane is not None:
            if plane.status != "active":
                raise Conflict(f"vm {msg.vm_id!r} has a {plane.status} plane on {self.host!r} (migrating)")
            del self.planes[msg.vm_id]
            await self._drop_plane(msg.vm_id)
        return Done(detail={"released": plane is not None})

    async def on_set_attributes(self, msg: SetAttributes, ctx: Context) -> Done:
        plane = self._plane(msg.vm_id)
        if plane.status not in ("active", "exporting"):
            raise Conflict(f"vm {msg.vm_id!r} is {plane.status} on {self.host!r}")
        element = plane.elements.get(msg.element_id)
        if element is None:
            raise InvalidMessage(f"vm {msg.vm_id!r} has no element {msg.element_id!r}")
        updated = element.model_copy(update={"attributes": {**element.attributes, **msg.attributes}})
        plane.elements[msg.element_id] = updated
        plane.mark_element(msg.element_id)
        await self.state.put(f"el.{msg.vm_id}", updated.id, updated.model_dump(mode="json"))
        await self._save_meta(plane)
        return Done()

    # ---- dispatch: the embots at work ---------------------------------------------
    async def on_dispatch(self, msg: DispatchEvents, ctx: Context) -> Done:
        plane = self._plane(msg.vm_id)
        if (plane.status == "staged" and msg.completed_by and msg.epoch and plane.migration_id == msg.completed_by
                and ctx.sender == host_identity(self.host, "sensor")):
            # this host's sensor was told of the completion first (step 7 tells both at once):
            # it dispatches only as the owner, and it became the owner by this migration. Only
            # that sender counts: a dispatch from anyone else must not move ownership
            await self.target.activate(plane, msg.epoch)
        if plane.status not in ("active", "exporting"):
            # fencing: only the owner's plane acts on events. While it is exported (the VM
            # pre-copies, then until the sensor's freeze) it acts on events as before; the
            # changes are dirty and reach the target in the next round. Once sealed, nothing
            # more may change here.
            raise Conflict(f"vm {msg.vm_id!r} is {plane.status} on {self.host!r}: not dispatching")
        ledger = self.ledger.setdefault(msg.vm_id, [])
        effects: list[tuple[str, str, str, Effect]] = []
        applied: list[str] = []
        touched: set[str] = set()
        for event in msg.events:
            if not plane.first_time(event.id):
                continue  # a redelivered dispatch: each event acts once
            applied.append(event.id)
            touched.update(plane.by_element.get(event.element_id, ()))
            effects.extend(apply_event(self.engine, plane, event))
        if applied:
            # the policies' state, the dedup window, the ledger and the effects still to send,
            # in one write before the ack: a crash leaves all of them or none, so a redelivery
            # neither applies an event twice nor loses what its policies asked for
            start = self._ledger_next.get(msg.vm_id, 0)
            ledger.extend(applied)
            self._ledger_next[msg.vm_id] = start + len(applied)
            outbox = self.outbox.add(plane, start, effects)
            vm = plane.vm_id
            await self.state.write([
                *((f"eb.{vm}", i, plane.embot(i).model_dump(mode="json")) for i in sorted(touched)),
                *((f"recent.{vm}", k, e) for k, e in plane.recent_rows(len(applied))),
                ("ledgers", vm, True),
                *((f"ledger.{vm}", f"{start + i:012d}", e) for i, e in enumerate(applied)),
                *((f"outbox.{vm}", key, row) for key, row in outbox),
                # while exported, what changed is kept with it: a restart must not forget what
                # the next dirty round has to send
                *([("plane", vm, plane.meta())] if plane.status == "exporting" else []),
            ])
            await self._drop_stale_recent(plane)
            if len(ledger) > self.ledger_max:
                del ledger[: len(ledger) - self.ledger_max]
            end = start + len(applied)
            if end - self._ledger_low.get(vm, 0) > self.ledger_max + self.ledger_max // 16:
                # after the write: a crash before this trim leaves a longer trail, not a gap.
                # The stored trail is trimmed in steps of 1/16: a range delete per dispatch
                # would cost as much as the dispatch
                await self.state.delete_through(f"ledger.{vm}", f"{end - self.ledger_max - 1:012d}")
                self._ledger_low[vm] = end - self.ledger_max
        # also on a redelivery that applies nothing: what a failed send left is sent now
        await self.outbox.send(msg.vm_id)
        return Done()  # answered only when asked (a drain's chunk); live dispatches are sent

    # ---- inspection -------------------------------------------------------------------
    async def on_inspect(self, msg: Inspect, ctx: Context) -> Inspection:
        return Inspection(host=self.host, service=self.service, data=self.inspect(msg.vm_id))

    def inspect(self, vm_id: str | None) -> dict[str, Any]:
        planes = {}
        for p in self.planes.values():
            if vm_id is not None and p.vm_id != vm_id:
                continue
            planes[p.vm_id] = {
                "status": p.status,
                "migration_id": p.migration_id,
                "epoch": p.epoch,
                "elements": {e.id: e.model_dump(mode="json") for e in p.elements.values()},
                "embots": {b: p.state[b] for b in p.embots},
            }
        ledger = {k: v for k, v in self.ledger.items() if vm_id is None or k == vm_id}
        return {"planes": planes, "ledger": ledger, "modules": [r.key for r in self.modules.refs()]}

    def _plane(self, vm_id: str) -> VmPlane:
        plane = self.planes.get(vm_id)
        if plane is None:
            raise Conflict(f"vm {vm_id!r} has no management plane on {self.host!r}")
        return plane
