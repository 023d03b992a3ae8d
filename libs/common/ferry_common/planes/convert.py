"""A plane document and the domain models, both ways.

``to_graph`` works out what the document leaves implicit (the VM of each element, module
digests, the manifest, policies named rather than written out); ``to_document`` writes a
graph back in the document's form, naming a policy wherever the embot's modules define the
very same one, so a document read back applies unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..messages.domain import Element, Embot, ManagementGraph, Module, ModuleRef, Policy
from ..messages.plane import PlaneDocument, PlaneElement, PlaneEmbot, PlaneModule

Lookup = Callable[[str], Module | None]  # "name@version" -> an installed module


class PlaneError(ValueError):
    """The document names something it does not define and the host does not have."""


def key(name: str, version: str) -> str:
    return f"{name}@{version}"


def modules_of(doc: PlaneDocument, lookup: Lookup) -> list[Module]:
    """The document's modules as domain modules, dependencies first; a dependency is taken
    from the document or else from ``lookup`` (the host's installed modules)."""
    pending = {key(m.name, m.version): m for m in doc.modules}
    if len(pending) != len(doc.modules):
        raise PlaneError("a module is defined twice")
    built: dict[str, Module] = {}

    def ref(dep: str, wanting: str) -> ModuleRef:
        if dep in built:
            return built[dep].ref()
        found = lookup(dep)
        if found is None:
            raise PlaneError(f"module {wanting} depends on {dep}, which is neither in the file nor installed")
        return found.ref()

    while pending:
        ready = [k for k, m in pending.items() if not any(d in pending for d in m.depends)]
        if not ready:
            raise PlaneError("modules depend on each other in a cycle: " + ", ".join(sorted(pending)))
        for k in ready:
            m = pending.pop(k)
            built[k] = Module(name=m.name, version=m.version, depends=[ref(d, k) for d in m.depends],
                              element_types=m.element_types, policies=m.policies)
    return list(built.values())


def closure(start: Iterable[str], lookup: Lookup) -> list[Module]:
    """The modules ``start`` names and everything they depend on, dependencies first."""
    out: dict[str, Module] = {}

    def visit(k: str, path: tuple[str, ...]) -> None:
        if k in out or k in path:
            return
        m = lookup(k)
        if m is None:
            raise PlaneError(f"module {k} is neither in the file nor installed")
        for d in m.depends:
            visit(d.key, (*path, k))
        out[k] = m

    for k in start:
        visit(k, ())
    return list(out.values())


def _policies_by_name(module_key: str, lookup: Lookup) -> dict[str, Policy]:
    """The policies the embot's module and the modules it depends on define, by name (the
    module's own first)."""
    found: dict[str, Policy] = {}
    for m in reversed(closure([module_key], lookup)):
        for p in m.policies:
            found.setdefault(p.name, p)
    return found


def to_graph(doc: PlaneDocument, lookup: Lookup) -> tuple[ManagementGraph, list[Module]]:
    """The graph the document describes, and the modules it defines (to install first).
    ``lookup`` finds installed modules the document does not define."""
    modules = modules_of(doc, lookup)
    mine = {key(m.name, m.version): m for m in modules}

    def find(k: str) -> Module | None:
        return mine.get(k) or lookup(k)

    used = list(dict.fromkeys([*(e.module for e in doc.elements), *(b.module for b in doc.embots)]))
    manifest = []
    for k in used:
        m = find(k)
        if m is None:
            raise PlaneError(f"module {k} is neither in the file nor installed")
        manifest.append(m.ref())
    elements = [Element(id=e.id, vm_id=doc.vm, type=e.type, module=e.module, depends_on=e.depends_on,
                        attributes=e.attributes) for e in doc.elements]
    if len({b.id for b in doc.embots}) != len(doc.embots):
        raise PlaneError("duplicate embot ids")
    embots = []
    for b in doc.embots:
        named = _policies_by_name(b.module, find)
        policies = []
        for p in b.policies:
            if isinstance(p, str):
                if p not in named:
                    raise PlaneError(f"embot {b.id!r}: no policy {p!r} in module {b.module} or its dependencies")
                policies.append(named[p])
            else:
                policies.append(p)
        embots.append(Embot(id=b.id, module=b.module, elements=b.elements, policies=policies, state=b.state))
    graph = ManagementGraph(vm_id=doc.vm, elements=elements, embots=embots, manifest=manifest)
    return graph, modules


def to_document(graph: ManagementGraph, lookup: Lookup, *, state: bool = False) -> PlaneDocument:
    """``graph`` in the document's form, with every module it needs (from ``lookup``).
    The embots' state is left out unless ``state``: a running embot keeps its own."""
    modules = closure([r.key for r in graph.manifest], lookup)
    elements = [PlaneElement(id=e.id, type=e.type, module=e.module, depends_on=e.depends_on,
                             attributes=e.attributes) for e in graph.elements]
    embots = []
    for b in graph.embots:
        named = _policies_by_name(b.module, lookup)
        policies: list[str | Policy] = [p.name if named.get(p.name) == p else p for p in b.policies]
        embots.append(PlaneEmbot(id=b.id, module=b.module, elements=b.elements, policies=policies,
                                 state=b.state if state else {}))
    return PlaneDocument(
        vm=graph.vm_id,
        modules=[PlaneModule(name=m.name, version=m.version, depends=[d.key for d in m.depends],
                             element_types=m.element_types, policies=m.policies) for m in modules],
        elements=elements,
        embots=embots,
    )


def retarget(doc: PlaneDocument, vm: str) -> PlaneDocument:
    """The document for VM ``vm``: its VM's name replaced, in every element and embot id (and
    reference to one) that is the name or starts with it and a dot (``web-01.disk0``)."""
    old = doc.vm
    if vm == old:
        return doc

    def rename(i: str) -> str:
        return vm if i == old else vm + i[len(old):] if i.startswith(old + ".") else i

    # validated again: a longer name may make an id too long
    return PlaneDocument.model_validate({
        "vm": vm,
        "modules": doc.modules,
        "elements": [e.model_copy(update={"id": rename(e.id), "depends_on": [rename(d) for d in e.depends_on]})
                     .model_dump() for e in doc.elements],
        "embots": [b.model_copy(update={"id": rename(b.id), "elements": [rename(x) for x in b.elements]})
                   .model_dump() for b in doc.embots],
    })
