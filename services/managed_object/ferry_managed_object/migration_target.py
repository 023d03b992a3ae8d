"""Migration, target side: a plane staged from the source's, its dirty rounds applied, then
activated, or dropped on rollback.

A transfer installs the modules that came with it and asks the source directly for any
still missing (a bounded number of rounds), then stages the plane. Completion makes the
staged plane the VM's under the new ownership epoch. A rolled-back migration is remembered,
so that a transfer arriving late does not stage a plane nothing would clean up again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ferry_common.bus.topology import host_command
from ferry_common.endpoint import Context, Forward
from ferry_common.errors import Conflict
from ferry_common.messages.base import Wire
from ferry_common.messages.commands import (
    CleanupTarget,
    Done,
    FetchModules,
    ManagedObjectInstantiationError,
    ManagementState,
    ManagementStateFailed,
    ManagementStateSuccess,
    MigrationComplete,
    MigrationCompleteAck,
    MigrationState,
    MigrationStateSuccess,
    ModulesRequired,
)
from ferry_common.messages.limits import MAX_MODULE_ROUNDS

from .modules import ModuleError
from .plane import GraphError, TypeResolutionError, VmPlane, check_graph

if TYPE_CHECKING:
    from .service import ManagedObjectService

CLEANED_MAX = 10_000  # rolled-back migrations remembered (a late transfer comes within minutes)


class MigrationTarget:
    """The target-side migration steps of one managed object."""

    def __init__(self, svc: ManagedObjectService) -> None:
        self.svc = svc
        # migrations rolled back on this host as a target: a state transfer for one of them that
        # arrives late (its source answered after the saga gave up) must not stage a plane that
        # nothing would clean up again; the newest CLEANED_MAX are kept, across restarts
        self.cleaned: dict[str, None] = {}

    async def restore(self) -> None:
        self.cleaned = dict.fromkeys(mid for mid, _ in await self.svc.state.items("cleaned"))

    async def on_state(self, msg: ManagementState, ctx: Context) -> Wire | Forward:
        if msg.migration_id in self.cleaned:
            return ManagementStateFailed(reason=f"migration {msg.migration_id} was rolled back on {self.svc.host!r}")
        existing = self.svc.planes.get(msg.vm_id)
        if existing is not None:
            if existing.status == "staged" and existing.migration_id == msg.migration_id:
                return ManagementStateSuccess(element_ids=list(existing.elements), **_fetched(msg))
            raise Conflict(f"vm {msg.vm_id!r} already has a {existing.status} plane on {self.svc.host!r}")
        graph = msg.graph
        if graph.vm_id != msg.vm_id:
            return ManagementStateFailed(reason=f"graph is for vm {graph.vm_id!r}, not {msg.vm_id!r}")
        try:
            wanted = {r.key: r for r in graph.manifest}
            for known in self.svc.modules.resolve(graph.manifest).resolved.values():
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
                    self.svc.modules.install(m, expected=wanted[f"{m.name}@{m.version}"])
                    wanted.update({d.key: d for d in m.depends})
                pending = [m for m in pending if m not in ready]
            await self.svc._save_modules(list(msg.modules))
            resolution = self.svc.modules.resolve(graph.manifest)
            if resolution.missing:
                if msg.source_host is None or msg.module_round >= MAX_MODULE_ROUNDS:
                    return ModulesRequired(missing=resolution.missing)
                # asked of the source directly: it sends the graph again with them, and the
                # answer still goes to whoever asked for the transfer
                fetch = FetchModules(migration_id=msg.migration_id, vm_id=msg.vm_id, refs=resolution.missing,
                                     target_host=self.svc.host, module_round=msg.module_round + 1,
                                     supplied=_fetched(msg)["modules_fetched"])
                return Forward(host_command(msg.source_host, self.svc.service), fetch)
            check_graph(graph, self.svc.modules, self.svc.engine)
        except (ModuleError, TypeResolutionError) as exc:
            return ManagedObjectInstantiationError(reason=str(exc))
        except GraphError as exc:
            return ManagementStateFailed(reason=str(exc))
        if msg.migration_id in self.cleaned:  # cleaned up while the modules were installed
            return ManagementStateFailed(reason=f"migration {msg.migration_id} was rolled back on {self.svc.host!r}")
        plane = self.svc.planes[msg.vm_id] = VmPlane.from_graph(graph, "staged", msg.migration_id)
        await self.svc._save_plane(plane)
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
        await self.svc.state.write([
            *((f"el.{vm}", e.id, e.model_dump(mode="json")) for e in msg.elements),
            *((f"eb.{vm}", b.id, plane.embot(b.id).model_dump(mode="json")) for b in msg.embots),
            *((f"recent.{vm}", k, e) for k, e in plane.recent_rows(known)),
        ])
        await self.svc._drop_stale_recent(plane)
        return MigrationStateSuccess(applied=len(msg.elements) + len(msg.embots))

    async def on_complete(self, msg: MigrationComplete, ctx: Context) -> Wire:
        done = self.svc.planes.get(msg.vm_id)
        if done is None or done.status != "active" or not msg.epoch or done.epoch != msg.epoch:
            await self.activate(self._staged(msg.vm_id, msg.migration_id), msg.epoch)
        # else done before (a crash took the answer with it, or a dispatch of the sensor's came first)
        return MigrationCompleteAck()

    async def activate(self, plane: VmPlane, epoch: int) -> None:
        """Step 7 on the target: the staged plane becomes the VM's, under ownership ``epoch``."""
        plane.status, plane.migration_id, plane.epoch = "active", None, epoch
        self.svc.ledger.setdefault(plane.vm_id, [])
        await self.svc._save_meta(plane)

    async def on_cleanup_target(self, msg: CleanupTarget, ctx: Context) -> Done:
        if msg.migration_id not in self.cleaned:
            self.cleaned[msg.migration_id] = None
            await self.svc.state.put("cleaned", msg.migration_id, msg.vm_id)
            while len(self.cleaned) > CLEANED_MAX:
                oldest = next(iter(self.cleaned))
                del self.cleaned[oldest]
                await self.svc.state.delete("cleaned", oldest)
        plane = self.svc.planes.get(msg.vm_id)
        if plane is not None and plane.status == "staged" and plane.migration_id == msg.migration_id:
            del self.svc.planes[msg.vm_id]
            await self.svc._drop_plane(msg.vm_id)
        return Done()

    def _staged(self, vm_id: str, migration_id: str) -> VmPlane:
        plane = self.svc._plane(vm_id)
        if plane.migration_id != migration_id or plane.status != "staged":
            raise Conflict(f"vm {vm_id!r} is {plane.status} here, not staged for {migration_id}")
        return plane


def _fetched(msg: ManagementState) -> dict[str, Any]:
    """What a transfer's answer says of the modules taken from the source on the way."""
    return {"modules_fetched": [*msg.supplied, *(f"{m.name}@{m.version}" for m in msg.modules)],
            "module_rounds": msg.module_round}
