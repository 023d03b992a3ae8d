"""Migration, source side: a VM's plane exported, its dirty rounds sent, then dropped or kept.

Export marks the plane ``exporting``: it still acts on events, and what changes is dirty
and goes to the target in the next round; the final round seals it (nothing changes here
any more). Host to host, the export and each round are forwarded to the target, which
answers whoever asked. Teardown drops the plane once the target owns the VM; clean-up makes
it ``active`` again after a rollback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ferry_common.bus.topology import host_command
from ferry_common.endpoint import Context, Forward
from ferry_common.errors import Conflict
from ferry_common.messages.base import Wire
from ferry_common.messages.commands import (
    CleanupSource,
    DirtyObjects,
    Done,
    ExportDirtyObjects,
    ExportManagementState,
    FetchModules,
    ManagedObjectInstantiationError,
    ManagementState,
    ManagementStateExport,
    ManagementStateFailed,
    MigrationState,
    MigrationStateSuccess,
    ModulesFetched,
    SourceTeardown,
)
from ferry_common.messages.domain import Module
from ferry_common.messages.limits import MAX_MODULES

if TYPE_CHECKING:
    from .service import ManagedObjectService


class MigrationSource:
    """The source-side migration steps of one managed object."""

    def __init__(self, svc: ManagedObjectService) -> None:
        self.svc = svc

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
            module = self.svc.modules.find(ref)
            if module is not None:
                found[ref.key] = module
                todo.extend(module.depends)
        if msg.target_host is None:
            return ModulesFetched(modules=list(found.values()))
        plane = self.svc.planes.get(msg.vm_id)
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
        plane = self.svc._plane(msg.vm_id)
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
            await self.svc._save_meta(plane)
        # sealed (a coordinator that resumed after the final round replays step 3 for the
        # staged graph's ids): nothing changes here any more, the target has it all
        if msg.target_host is None:
            return ManagementStateExport(graph=plane.graph())
        # host to host: the target stages the graph and answers the requester
        staged = ManagementState(migration_id=msg.migration_id, vm_id=msg.vm_id, graph=plane.graph(), modules=msg.modules,
                                 source_host=self.svc.host, module_round=module_round, supplied=supplied or [])
        return Forward(host_command(msg.target_host, self.svc.service), staged)

    async def on_export_dirty(self, msg: ExportDirtyObjects, ctx: Context) -> Wire | Forward:
        plane = self.svc._plane(msg.vm_id)
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
        await self.svc._save_meta(plane)
        if msg.target_host is None:
            return DirtyObjects(elements=elements, embots=embots, round=plane.dirty_round, recent_event_ids=recent)
        if not elements and not embots and not recent:
            return MigrationStateSuccess(applied=0)  # nothing to send
        # host to host, as the export: the target applies the round and answers the requester
        return Forward(host_command(msg.target_host, self.svc.service),
                       MigrationState(migration_id=msg.migration_id, vm_id=msg.vm_id, elements=elements,
                                      embots=embots, round=plane.dirty_round, recent_event_ids=recent))

    async def on_teardown(self, msg: SourceTeardown, ctx: Context) -> Done:
        plane = self.svc.planes.get(msg.vm_id)
        if plane is not None and plane.migration_id == msg.migration_id and plane.status in ("exporting", "sealed"):
            del self.svc.planes[msg.vm_id]
            await self.svc._drop_plane(msg.vm_id)
        return Done()

    async def on_cleanup_source(self, msg: CleanupSource, ctx: Context) -> Done:
        plane = self.svc.planes.get(msg.vm_id)
        if plane is not None and plane.migration_id == msg.migration_id and plane.status in ("exporting", "sealed"):
            plane.status, plane.migration_id = "active", None
            plane.dirty_elements.clear()
            plane.dirty_embots.clear()
            await self.svc._save_meta(plane)
        return Done()
