"""A VM's plane set and read as a document (``ferry plane apply`` / ``get``).

Applying to a VM without a plane here creates it; applying to a running plane makes it
what the document says, in place: an embot that stays keeps its live state, less what only
its removed policies kept (their keys and their alarms); a removed embot's state goes with
it. Events already acted on stay acted on (the dedup window, the ledger and the ownership
epoch are untouched). The document again is ``unchanged``. A plane that is part of a
migration (exported, sealed or staged) is not changed: ``plane_migrating``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ferry_common.bus.topology import host_command
from ferry_common.endpoint import Context
from ferry_common.errors import Conflict, FerryError, InvalidMessage
from ferry_common.messages.commands import Inspect, Inspection
from ferry_common.messages.domain import Embot, ManagementGraph, Module, Policy
from ferry_common.messages.planes import ApplyPlane, GetPlane, PlaneApplied, PlaneFound
from ferry_common.planes.convert import PlaneError, to_document, to_graph

from .host_plane import host_plane_id
from .modules import ModuleError, ModuleRegistry
from .plane import GraphError, TypeResolutionError, VmPlane, check_graph

if TYPE_CHECKING:
    from .service import ManagedObjectService


class PlaneMigrating(Conflict):
    """The plane is part of a migration: it changes once the migration has ended."""

    code = "plane_migrating"


class NotHere(Conflict):
    """The VM does not run on this host: its plane is made where it runs."""

    code = "vm_not_here"


# how long a plane's creation waits for this host's hypervisor adapter to say the VM runs here
ADAPTER_TIMEOUT_S = 5.0


class PlaneFiles:
    """The handlers of :class:`ApplyPlane` and :class:`GetPlane` for one managed object."""

    def __init__(self, svc: ManagedObjectService) -> None:
        self.svc = svc

    async def on_get(self, msg: GetPlane, ctx: Context) -> PlaneFound:
        plane = self.svc._plane(msg.vm_id)
        try:
            doc = to_document(declared(plane), self.svc.modules.get)
        except (PlaneError, ValidationError) as exc:  # a module the plane needs is gone
            raise Conflict(f"vm {msg.vm_id!r}: the plane cannot be written as a document: {exc}") from None
        return PlaneFound(plane=doc)

    async def on_apply(self, msg: ApplyPlane, ctx: Context) -> PlaneApplied:
        svc, vm = self.svc, msg.plane.vm
        plane = svc.planes.get(vm)
        if plane is not None and plane.status != "active":
            raise PlaneMigrating(f"vm {vm!r} is migrating (its plane is {plane.status} on {svc.host!r} for "
                                 f"migration {plane.migration_id}): apply the plane once the migration has ended")
        # checked on a copy of the registry: a plane refused installs none of its modules
        trial = ModuleRegistry()
        for ref in svc.modules.refs():
            found = svc.modules.get(ref.key)
            assert found is not None
            trial.install(found)
        try:
            graph, modules = to_graph(msg.plane, trial.get)
            new = [m for m in modules if svc.modules.find(m.ref()) is None]
            for m in new:
                trial.install(m)
            check_graph(graph, trial, svc.engine)
        except ModuleError as exc:
            raise InvalidMessage(f"{exc}: a module's content changes with its version") from None
        except (PlaneError, GraphError, TypeResolutionError, ValidationError) as exc:
            raise InvalidMessage(str(exc)) from None
        if plane is None:
            return await self._create(graph, new)
        if _same(declared(plane), graph) and not new:
            return PlaneApplied(vm_id=vm, result="unchanged")
        # nothing awaited from here to the write: a dispatch sees the old plane or the new one
        for m in new:
            svc.modules.install(m)
        diff = _update(plane, graph)
        await svc._save_modules(new)
        await svc._save_plane(plane)
        return PlaneApplied(vm_id=vm, result="updated", modules_installed=[_key(m) for m in new], **diff)

    async def _vm_runs_here(self, vm_id: str) -> None:
        """Only where the VM runs may its plane be made: one made elsewhere (a stale placement,
        a VM that has moved on) would be a second active plane."""
        svc = self.svc
        if vm_id == host_plane_id(svc.host):
            return  # this host's own plane (ferry_managed_object.host_plane): the host runs here
        try:
            ans = await svc.endpoint.request(host_command(svc.host, "hypervisor_adapter"), Inspect(vm_id=vm_id),
                                             timeout=ADAPTER_TIMEOUT_S)
        except FerryError as exc:
            raise FerryError(f"the hypervisor adapter of {svc.host!r} did not say whether {vm_id!r} runs here: "
                             f"{exc.reason}", code="adapter_unavailable") from None
        vms = ans.data.get("vms") if isinstance(ans, Inspection) else None
        state = vms.get(vm_id, "absent") if isinstance(vms, dict) else "absent"
        if state != "running":
            raise NotHere(f"vm {vm_id!r} is {state} on {svc.host!r}, not running: apply its plane where it runs")

    async def _create(self, graph: ManagementGraph, new: list[Module]) -> PlaneApplied:
        svc = self.svc
        await self._vm_runs_here(graph.vm_id)
        if graph.vm_id in svc.planes:  # made meanwhile, by another apply or a migration
            raise Conflict(f"vm {graph.vm_id!r} got a plane on {svc.host!r} meanwhile: apply again")
        for m in new:
            svc.modules.install(m)
        plane = svc.planes[graph.vm_id] = VmPlane.from_graph(graph, "active")
        svc.ledger.setdefault(graph.vm_id, [])
        await svc._save_modules(new)
        await svc._save_plane(plane)
        return PlaneApplied(vm_id=graph.vm_id, result="created", modules_installed=[_key(m) for m in new],
                            added=[*(e.id for e in graph.elements), *(b.id for b in graph.embots)])


def declared(plane: VmPlane) -> ManagementGraph:
    """The plane as it was declared: its elements and embots without the embots' live state."""
    return ManagementGraph(vm_id=plane.vm_id, elements=list(plane.elements.values()),
                           embots=[b.model_copy(update={"state": {}}) for b in plane.embots.values()],
                           manifest=list(plane.manifest))


def _same(current: ManagementGraph, wanted: ManagementGraph) -> bool:
    def norm(g: ManagementGraph) -> Any:
        return ({e.id: e for e in g.elements}, {b.id: b.model_copy(update={"state": {}}) for b in g.embots},
                {r.key: r for r in g.manifest})
    return bool(norm(current) == norm(wanted))


def _update(plane: VmPlane, graph: ManagementGraph) -> dict[str, list[str]]:
    """Make ``plane`` what ``graph`` declares, in place; what was added, removed, changed."""
    old_elements, old_embots = plane.elements, plane.embots
    state: dict[str, dict[str, object]] = {}
    for b in graph.embots:
        before = old_embots.get(b.id)
        state[b.id] = dict(b.state) if before is None else _kept_state(plane.state[b.id], before, b)
    plane.elements = {e.id: e for e in graph.elements}
    # the declared embots, without state (as a registered embot; the live state is ``state``)
    plane.embots = {b.id: b for b in graph.embots}
    plane.state = state
    plane.manifest = list(graph.manifest)
    plane.reindex()
    old = {**{f"e:{i}": e for i, e in old_elements.items()},
           **{f"b:{i}": b.model_copy(update={"state": {}}) for i, b in old_embots.items()}}
    new = {**{f"e:{i}": e for i, e in plane.elements.items()},
           **{f"b:{i}": b.model_copy(update={"state": {}}) for i, b in plane.embots.items()}}
    return {"added": [k[2:] for k in new if k not in old], "removed": [k[2:] for k in old if k not in new],
            "changed": [k[2:] for k in new if k in old and old[k] != new[k]]}


def _owned(policies: list[Policy]) -> tuple[set[str], set[str]]:
    """The state keys and the alarms these policies write."""
    keys, alarms = set(), set()
    for p in policies:
        for a in p.actions:
            if a.kind == "set":
                keys.add(a.key or "value")
            elif a.kind == "increment":
                keys.add(a.key or "count")
            elif a.kind in ("alarm", "clear_alarm"):
                alarms.add(a.key or p.name)
    return keys, alarms


def _kept_state(live: dict[str, object], before: Embot, after: Embot) -> dict[str, object]:
    """``live`` less what only the policies ``after`` no longer has wrote."""
    old_keys, old_alarms = _owned(before.policies)
    new_keys, new_alarms = _owned(after.policies)
    kept = {k: v for k, v in live.items() if k not in old_keys - new_keys}
    if isinstance(alarms := kept.get("alarms"), dict):
        kept["alarms"] = {k: v for k, v in alarms.items() if k not in old_alarms - new_alarms}
    return kept


def _key(m: Module) -> str:
    return f"{m.name}@{m.version}"
