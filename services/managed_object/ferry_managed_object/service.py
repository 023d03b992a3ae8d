"""The managed-object service: the registry of a host's managed elements and embots.

It runs the embots' policies on the events the sensor dispatches, serializes a VM's
plane for migration, tracks what changes while the VM migrates (dirty elements and
embots), and stages, checks and activates a plane that arrives from another host.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ferry_common.bus.topology import (
    MIGRATION_REQUESTED,
    alarm,
    host_command,
    host_event,
    host_load,
    vm_events,
)
from ferry_common.endpoint import Context, Endpoint, Forward
from ferry_common.errors import Conflict, FerryError, InvalidMessage
from ferry_common.ids import new_id
from ferry_common.messages.base import Wire
from ferry_common.messages.commands import (
    CleanupSource,
    CleanupTarget,
    DirtyObjects,
    DispatchEvents,
    Done,
    ExportDirtyObjects,
    ExportManagementState,
    FetchModules,
    Inspect,
    Inspection,
    InstallModules,
    ManagedObjectInstantiationError,
    ManagementState,
    ManagementStateExport,
    ManagementStateFailed,
    ManagementStateSuccess,
    MigrationComplete,
    MigrationCompleteAck,
    MigrationState,
    MigrationStateSuccess,
    ModulesFetched,
    ModulesRequired,
    RegisterManagementGraph,
    ReleaseVm,
    SetAttributes,
    SourceTeardown,
)
from ferry_common.messages.domain import Element, Embot, Module
from ferry_common.messages.host_events import HostFaultEvent, HostLoad
from ferry_common.messages.limits import MAX_MODULE_ROUNDS, MAX_MODULES
from ferry_common.messages.planes import ApplyPlane, GetPlane
from ferry_common.messages.public import Alarm, MigrateRequest, VmEvent
from ferry_common.messages.recommendations import EvacuationWanted, MigrationWanted
from ferry_common.security import host_identity
from ferry_common.service import HostService
from ferry_common.state import StateStore

from .autonomic import wanted
from .host_plane import HostFeed
from .modules import ModuleError, ModuleRegistry
from .plane import GraphError, TypeResolutionError, VmPlane, apply_event, check_graph
from .plane_files import PlaneFiles
from .policy import Effect, PolicyEngine

log = logging.getLogger(__name__)
# the audit trail kept per VM and host (FERRY_LEDGER_MAX): enough to verify a migration's
# events were each dispatched once; an event id is ~32 bytes, so 10k ids cost ~1 MB per VM
LEDGER_MAX = 10_000
_OUTGOING: dict[str, type[Wire]] = {
    m.__name__: m for m in (Alarm, VmEvent, MigrateRequest, MigrationWanted, EvacuationWanted)}


CLEANED_MAX = 10_000  # rolled-back migrations remembered (a late transfer comes within minutes)


class ManagedObjectService(HostService):
    service = "managed_object"

    def __init__(self, host: str, endpoint: Endpoint, state: StateStore | None = None, *,
                 ledger_max: int = LEDGER_MAX) -> None:
        super().__init__(host, endpoint, state)
        self.modules = ModuleRegistry()
        self.engine = PolicyEngine()
        self.planes: dict[str, VmPlane] = {}
        # migrations rolled back on this host as a target: a state transfer for one of them that
        # arrives late (its source answered after the saga gave up) must not stage a plane that
        # nothing would clean up again; the newest CLEANED_MAX are kept, across restarts
        self.cleaned: dict[str, None] = {}
        # what was dispatched here, per VM, kept after the VM leaves: the audit trail of the
        # newest ``ledger_max`` events per VM (a host dispatches for months: it must not grow
        # without bound, in memory or in the state store)
        self.ledger: dict[str, list[str]] = {}
        self.ledger_max = ledger_max
        self._ledger_next: dict[str, int] = {}  # per VM, the sequence number of the next entry
        self._ledger_low: dict[str, int] = {}  # per VM, the oldest sequence number still stored
        # per VM, what its policies asked to send that is not out yet, oldest first
        self.outbox: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        # one sender per VM's outbox: two dispatches handled at once would send its head twice
        self._outbox_locks: dict[str, asyncio.Lock] = {}
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
        r.add(FetchModules, self.on_fetch_modules)
        r.add(ExportManagementState, self.on_export)
        r.add(ManagementState, self.on_state)  # not memoised: ModulesRequired is answered again
        r.add(ExportDirtyObjects, self.on_export_dirty)
        self.step(MigrationState, self.on_migration_state)
        # not memoised: activating is idempotent itself, and a replay is passed on again
        r.add(MigrationComplete, self.on_complete)
        self.step(SourceTeardown, self.on_teardown)
        self.step(CleanupTarget, self.on_cleanup_target)
        self.step(CleanupSource, self.on_cleanup_source)
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
        self.cleaned = dict.fromkeys(mid for mid, _ in await self.state.items("cleaned"))
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
            if pending := await self.state.items(f"outbox.{key}"):
                self.outbox[key] = pending

    async def start(self) -> None:
        await super().start()
        if self.outbox:  # left by a crash between the write and the sends
            await self._send_all_outboxes()

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
            await self._activate(plane, msg.epoch)
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
            outbox = [(f"{start:012d}.{j:04d}", row) for j, row in enumerate(self._outgoing(plane, effects))]
            self.outbox.setdefault(plane.vm_id, []).extend(outbox)
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
        await self._send_outbox(msg.vm_id)
        return Done()  # answered only when asked (a drain's chunk); live dispatches are sent

    def _outgoing(self, plane: VmPlane, effects: list[tuple[str, str, str, Effect]]) -> list[dict[str, Any]]:
        """The messages ``effects`` ask for, made once: a resend carries the same ids."""
        out: list[dict[str, Any]] = []
        for element_id, embot_id, policy, effect in effects:
            msg: Wire
            if effect.kind == "alarm":
                detail = effect.value if isinstance(effect.value, dict) else {"value": effect.value}
                msg = Alarm(vm_id=plane.vm_id, element_id=element_id, embot_id=embot_id, policy=policy,
                            host=self.host, name=effect.key or policy, detail=detail)
                key = alarm(plane.vm_id)
            elif effect.kind == "emit":
                data = effect.value if isinstance(effect.value, dict) else {"value": effect.value}
                msg = VmEvent(id=new_id(), vm_id=plane.vm_id, element_id=element_id, kind=effect.key or "emitted",
                              ts=self.endpoint.clock.now(), data=data)
                key = vm_events(plane.vm_id)
            elif (asked := wanted(effect, vm_id=plane.vm_id, host=self.host, policy=policy,
                                  embot_id=embot_id)) is not None:
                key, msg = asked  # the balancer's actions (ferry_managed_object.autonomic)
            elif effect.kind == "migrate" and effect.target_host:
                # a fixed id: the coordinator starts one migration however often this is sent
                msg = MigrateRequest(vm_id=plane.vm_id, target_host=effect.target_host, migration_id=new_id(),
                                     reason=f"policy {policy} of {embot_id}")
                key = MIGRATION_REQUESTED
            else:
                continue
            out.append({"key": key, "type": type(msg).__name__, "body": msg.model_dump(mode="json")})
        return out

    async def _send_outbox(self, vm_id: str) -> None:
        """Send what ``vm_id``'s policies asked for, oldest first; each entry leaves the outbox
        once sent (or refused for good). A passing fault stops here and is raised, so the
        delivery comes again and the rest goes then."""
        if not self.outbox.get(vm_id):
            return
        async with self._outbox_locks.setdefault(vm_id, asyncio.Lock()):
            await self._send_pending(vm_id)

    async def _send_pending(self, vm_id: str) -> None:
        pending = self.outbox.get(vm_id)
        while pending:
            key, row = pending[0]
            model = _OUTGOING[row["type"]]
            try:
                await self.endpoint.send(row["key"], model.model_validate(row["body"]))
            except FerryError as exc:
                if exc.retryable:
                    raise
                # nobody listens for this alarm or event: the state change still stands
                log.info("%s of %s not delivered: %s", row["type"], vm_id, exc.reason)
            await self.state.delete(f"outbox.{vm_id}", key)
            pending.pop(0)

    async def _send_all_outboxes(self) -> None:
        for vm_id in list(self.outbox):
            try:
                await self._send_outbox(vm_id)
            except FerryError as exc:
                log.info("outbox of %s waits for the next dispatch: %s", vm_id, exc.reason)

    # ---- migration, source side -----------------------------------------------------
    async def on_fetch_modules(self, msg: FetchModules, ctx: Context) -> Wire | Forward:
        """The modules asked for and, after them, every module they depend on (transitively)
        that this host has: the target would ask for those next. Asked by the target (host to
        host), the graph goes to it again with them."""
        found: dict[str, Module] = {}
        todo = list(msg.refs)
        while todo and len(found) < MAX_MODULES:
            ref = todo.pop(0)
            if ref.key in found:
                continue
            module = self.modules.find(ref)
            if module is not None:
                found[ref.key] = module
                todo.extend(module.depends)
        if msg.target_host is None:
            return ModulesFetched(modules=list(found.values()))
        plane = self.planes.get(msg.vm_id)
        if plane is None or plane.migration_id != msg.migration_id or plane.status not in ("exporting", "sealed"):
            # late: the export it belongs to was rolled back meanwhile, and a fetch must not
            # start another (the requester gave up on this answer)
            return ManagementStateFailed(reason=f"vm {msg.vm_id!r} is not exported for migration {msg.migration_id}")
        lacking = [r.key for r in msg.refs if r.key not in found]
        if lacking:
            return ManagedObjectInstantiationError(reason=f"modules unknown on both hosts: {', '.join(lacking)}")
        export = ExportManagementState(migration_id=msg.migration_id, vm_id=msg.vm_id, target_host=msg.target_host,
                                       modules=list(found.values()))
        return await self._export(export, module_round=msg.module_round, supplied=msg.supplied)

    async def on_export(self, msg: ExportManagementState, ctx: Context) -> Wire | Forward:
        return await self._export(msg)

    async def _export(self, msg: ExportManagementState, *, module_round: int = 0,
                      supplied: list[str] | None = None) -> Wire | Forward:
        plane = self._plane(msg.vm_id)
        if plane.status == "active":
            plane.status, plane.migration_id = "exporting", msg.migration_id
            plane.changed_elements.clear()
            plane.changed_embots.clear()
            plane.recent_at_export = plane.recent_at_round = plane.recent_next
        elif plane.migration_id != msg.migration_id or plane.status not in ("exporting", "sealed"):
            raise Conflict(f"vm {msg.vm_id!r} is {plane.status} for migration {plane.migration_id}")
        if plane.status == "exporting":
            # a replayed export sends the current state; dirt since the first export is in it
            plane.dirty_elements.clear()
            plane.dirty_embots.clear()
            plane.recent_at_round = plane.recent_next
            await self._save_meta(plane)
        # sealed (a coordinator that resumed after the final round replays step 3 for the
        # staged graph's ids): nothing changes here any more, the target has it all
        if msg.target_host is None:
            return ManagementStateExport(graph=plane.graph())
        # host to host: the target stages the graph and answers the requester
        staged = ManagementState(migration_id=msg.migration_id, vm_id=msg.vm_id, graph=plane.graph(), modules=msg.modules,
                                 source_host=self.host, module_round=module_round, supplied=supplied or [])
        return Forward(host_command(msg.target_host, self.service), staged)

    async def on_export_dirty(self, msg: ExportDirtyObjects, ctx: Context) -> Wire | Forward:
        plane = self._plane(msg.vm_id)
        if plane.migration_id != msg.migration_id or plane.status not in ("exporting", "sealed"):
            raise Conflict(f"vm {msg.vm_id!r} is {plane.status} for migration {plane.migration_id}")
        element_ids = plane.changed_elements if msg.since_export else plane.dirty_elements
        embot_ids = plane.changed_embots if msg.since_export else plane.dirty_embots
        elements = [plane.elements[i] for i in sorted(element_ids) if i in plane.elements]
        embots = [plane.embot(i) for i in sorted(embot_ids) if i in plane.embots]
        recent = plane.recent_since(plane.recent_at_export if msg.since_export else plane.recent_at_round)
        # the seed resets dirty bits as it serializes; a lost answer is covered by the final round
        plane.dirty_elements.clear()
        plane.dirty_embots.clear()
        plane.recent_at_round = plane.recent_next
        plane.dirty_round += 1
        if msg.final:
            plane.status = "sealed"
        await self._save_meta(plane)
        if msg.target_host is None:
            return DirtyObjects(elements=elements, embots=embots, round=plane.dirty_round, recent_event_ids=recent)
        if not elements and not embots and not recent:
            return MigrationStateSuccess(applied=0)  # nothing to send
        # host to host, as the export: the target applies the round and answers the requester
        return Forward(host_command(msg.target_host, self.service),
                       MigrationState(migration_id=msg.migration_id, vm_id=msg.vm_id, elements=elements,
                                      embots=embots, round=plane.dirty_round, recent_event_ids=recent))

    async def on_teardown(self, msg: SourceTeardown, ctx: Context) -> Done:
        plane = self.planes.get(msg.vm_id)
        if plane is not None and plane.migration_id == msg.migration_id and plane.status in ("exporting", "sealed"):
            del self.planes[msg.vm_id]
            await self._drop_plane(msg.vm_id)
        return Done()

    async def on_cleanup_source(self, msg: CleanupSource, ctx: Context) -> Done:
        plane = self.planes.get(msg.vm_id)
        if plane is not None and plane.migration_id == msg.migration_id and plane.status in ("exporting", "sealed"):
            plane.status, plane.migration_id = "active", None
            plane.dirty_elements.clear()
            plane.dirty_embots.clear()
            await self._save_meta(plane)
        return Done()

    # ---- migration, target side -----------------------------------------------------
    async def on_state(self, msg: ManagementState, ctx: Context) -> Wire | Forward:
        if msg.migration_id in self.cleaned:
            return ManagementStateFailed(reason=f"migration {msg.migration_id} was rolled back on {self.host!r}")
        existing = self.planes.get(msg.vm_id)
        if existing is not None:
            if existing.status == "staged" and existing.migration_id == msg.migration_id:
                return ManagementStateSuccess(element_ids=list(existing.elements), **_fetched(msg))
            raise Conflict(f"vm {msg.vm_id!r} already has a {existing.status} plane on {self.host!r}")
        graph = msg.graph
        if graph.vm_id != msg.vm_id:
            return ManagementStateFailed(reason=f"graph is for vm {graph.vm_id!r}, not {msg.vm_id!r}")
        try:
            wanted = {r.key: r for r in graph.manifest}
            for known in self.modules.resolve(graph.manifest).resolved.values():
                wanted.update({d.key: d for d in known.depends})
            # a supplied module is wanted if the manifest names it or a wanted module depends on
            # it: the source sends a requested module's dependencies along, so a target lacking
            # a chain of modules gets it in one round, not one round per level
            pending = list(msg.modules)
            while pending:
                ready = [m for m in pending if f"{m.name}@{m.version}" in wanted]
                if not ready:
                    m = pending[0]
                    return ManagedObjectInstantiationError(reason=f"module {m.name}@{m.version} was not asked for")
                for m in ready:
                    self.modules.install(m, expected=wanted[f"{m.name}@{m.version}"])
                    wanted.update({d.key: d for d in m.depends})
                pending = [m for m in pending if m not in ready]
            await self._save_modules(list(msg.modules))
            resolution = self.modules.resolve(graph.manifest)
            if resolution.missing:
                if msg.source_host is None or msg.module_round >= MAX_MODULE_ROUNDS:
                    return ModulesRequired(missing=resolution.missing)
                # asked of the source directly: it sends the graph again with them, and the
                # answer still goes to whoever asked for the transfer
                fetch = FetchModules(migration_id=msg.migration_id, vm_id=msg.vm_id, refs=resolution.missing,
                                     target_host=self.host, module_round=msg.module_round + 1,
                                     supplied=_fetched(msg)["modules_fetched"])
                return Forward(host_command(msg.source_host, self.service), fetch)
            check_graph(graph, self.modules, self.engine)
        except (ModuleError, TypeResolutionError) as exc:
            return ManagedObjectInstantiationError(reason=str(exc))
        except GraphError as exc:
            return ManagementStateFailed(reason=str(exc))
        if msg.migration_id in self.cleaned:  # cleaned up while the modules were installed
            return ManagementStateFailed(reason=f"migration {msg.migration_id} was rolled back on {self.host!r}")
        plane = self.planes[msg.vm_id] = VmPlane.from_graph(graph, "staged", msg.migration_id)
        await self._save_plane(plane)
        # the plane itself, not a lookup: a clean-up handled meanwhile may have dropped it
        return ManagementStateSuccess(element_ids=list(plane.elements), **_fetched(msg))

    async def on_migration_state(self, msg: MigrationState, ctx: Context) -> Wire:
        plane = self._staged(msg.vm_id, msg.migration_id)
        for e in msg.elements:
            if e.id not in plane.elements or e.vm_id != msg.vm_id:
                return ManagementStateFailed(reason=f"dirty element {e.id!r} was never staged")
        for b in msg.embots:
            if b.id not in plane.embots:
                return ManagementStateFailed(reason=f"dirty embot {b.id!r} was never staged")
        for e in msg.elements:
            plane.elements[e.id] = e
        for b in msg.embots:
            plane.embots[b.id] = b
            plane.state[b.id] = dict(b.state)
        plane.reindex()
        # the events the source acted on meanwhile: acted on, as far as this host is concerned
        known = sum(1 for i in msg.recent_event_ids if plane.first_time(i))
        vm = msg.vm_id
        await self.state.write([
            *((f"el.{vm}", e.id, e.model_dump(mode="json")) for e in msg.elements),
            *((f"eb.{vm}", b.id, plane.embot(b.id).model_dump(mode="json")) for b in msg.embots),
            *((f"recent.{vm}", k, e) for k, e in plane.recent_rows(known)),
        ])
        await self._drop_stale_recent(plane)
        return MigrationStateSuccess(applied=len(msg.elements) + len(msg.embots))

    async def on_complete(self, msg: MigrationComplete, ctx: Context) -> Wire:
        done = self.planes.get(msg.vm_id)
        if done is None or done.status != "active" or not msg.epoch or done.epoch != msg.epoch:
            await self._activate(self._staged(msg.vm_id, msg.migration_id), msg.epoch)
        # else done before (a crash took the answer with it, or a dispatch of the sensor's came first)
        return MigrationCompleteAck()

    async def _activate(self, plane: VmPlane, epoch: int) -> None:
        """Step 7 on the target: the staged plane becomes the VM's, under ownership ``epoch``."""
        plane.status, plane.migration_id, plane.epoch = "active", None, epoch
        self.ledger.setdefault(plane.vm_id, [])
        await self._save_meta(plane)

    async def on_cleanup_target(self, msg: CleanupTarget, ctx: Context) -> Done:
        if msg.migration_id not in self.cleaned:
            self.cleaned[msg.migration_id] = None
            await self.state.put("cleaned", msg.migration_id, msg.vm_id)
            while len(self.cleaned) > CLEANED_MAX:
                oldest = next(iter(self.cleaned))
                del self.cleaned[oldest]
                await self.state.delete("cleaned", oldest)
        plane = self.planes.get(msg.vm_id)
        if plane is not None and plane.status == "staged" and plane.migration_id == msg.migration_id:
            del self.planes[msg.vm_id]
            await self._drop_plane(msg.vm_id)
        return Done()

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

    def _staged(self, vm_id: str, migration_id: str) -> VmPlane:
        plane = self._plane(vm_id)
        if plane.migration_id != migration_id or plane.status != "staged":
            raise Conflict(f"vm {vm_id!r} is {plane.status} here, not staged for {migration_id}")
        return plane


def _fetched(msg: ManagementState) -> dict[str, Any]:
    """What a transfer's answer says of the modules taken from the source on the way."""
    return {"modules_fetched": [*msg.supplied, *(f"{m.name}@{m.version}" for m in msg.modules)],
            "module_rounds": msg.module_round}
