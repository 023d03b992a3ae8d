"""The management plane of one VM on one host, and the checks a received graph must pass."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from ferry_common.messages.domain import Element, Embot, Event, ManagementGraph, ModuleRef
from ferry_common.messages.limits import MAX_RECENT_IDS

from .modules import ModuleRegistry
from .policy import Effect, PolicyEngine, PolicyError

Status = Literal["active", "exporting", "sealed", "staged"]
RECENT_IDS = MAX_RECENT_IDS
MAX_DEPTH = 64


class GraphError(Exception):
    """The graph cannot be rebuilt (a Management State Failed)."""


class TypeResolutionError(Exception):
    """A type cannot be resolved (a Managed Object Instantiation Error)."""


@dataclass
class VmPlane:
    vm_id: str
    status: Status
    elements: dict[str, Element]
    embots: dict[str, Embot]
    state: dict[str, dict[str, object]]  # embot id -> live policy state
    manifest: list = field(default_factory=list)
    migration_id: str | None = None
    epoch: int = 0
    recent: OrderedDict[str, None] = field(default_factory=OrderedDict)
    # the dedup window is stored a row per id, keyed by this counter: a dispatch writes its new
    # ids, not the whole window; ``recent_trimmed`` says old rows are due to go
    recent_next: int = 0
    recent_trimmed: bool = False
    dirty_elements: set[str] = field(default_factory=set)
    dirty_embots: set[str] = field(default_factory=set)
    # everything changed since the first export: the final round resends it all, in case a
    # dirty round's answer was lost (with a connection, or the coordinator that asked for it)
    changed_elements: set[str] = field(default_factory=set)
    changed_embots: set[str] = field(default_factory=set)
    by_element: dict[str, list[str]] = field(default_factory=dict)
    dirty_round: int = 0
    # ``recent_next`` at the first export and at the last dirty round: the ids acted on since
    # go with the next round, so the target's dedup window knows every event acted on here
    recent_at_export: int = 0
    recent_at_round: int = 0

    @classmethod
    def from_graph(cls, graph: ManagementGraph, status: Status, migration_id: str | None = None) -> VmPlane:
        plane = cls(
            vm_id=graph.vm_id,
            status=status,
            elements={e.id: e for e in graph.elements},
            embots={b.id: b for b in graph.embots},
            state={b.id: dict(b.state) for b in graph.embots},
            manifest=list(graph.manifest),
            migration_id=migration_id,
            recent=OrderedDict.fromkeys(graph.recent_event_ids),
        )
        plane.recent_next = len(plane.recent)
        plane.reindex()
        return plane

    def reindex(self) -> None:
        self.by_element = {}
        for b in self.embots.values():
            for eid in b.elements:
                self.by_element.setdefault(eid, []).append(b.id)

    def embot(self, embot_id: str) -> Embot:
        b = self.embots[embot_id]
        return b.model_copy(update={"state": self.state[embot_id]})

    def graph(self) -> ManagementGraph:
        return ManagementGraph(
            vm_id=self.vm_id,
            elements=list(self.elements.values()),
            embots=[self.embot(i) for i in self.embots],
            manifest=self.manifest,
            recent_event_ids=list(self.recent)[-RECENT_IDS:],
        )

    def first_time(self, event_id: str) -> bool:
        if event_id in self.recent:
            return False
        self.recent[event_id] = None
        self.recent_next += 1
        if len(self.recent) > RECENT_IDS * 4:
            for _ in range(RECENT_IDS):
                self.recent.popitem(last=False)
            self.recent_trimmed = True
        return True

    def recent_rows(self, n: int) -> list[tuple[str, str]]:
        """The stored rows of the ``n`` newest ids of the window."""
        ids = list(itertools.islice(reversed(self.recent), n))[::-1]
        return [(f"{self.recent_next - len(ids) + i:012d}", e) for i, e in enumerate(ids)]

    def recent_since(self, mark: int) -> list[str]:
        """The ids that entered the window since ``recent_next`` was ``mark`` (the newest
        ``RECENT_IDS`` of them: the window a graph carries is no longer)."""
        n = min(self.recent_next - mark, len(self.recent), RECENT_IDS)
        return list(itertools.islice(reversed(self.recent), max(n, 0)))[::-1]

    def recent_stale_key(self) -> str:
        """The newest stored key no longer in the window (rows up to it can go)."""
        return f"{self.recent_next - len(self.recent) - 1:012d}"

    def mark_element(self, element_id: str) -> None:
        if self.status == "exporting":
            self.dirty_elements.add(element_id)
            self.changed_elements.add(element_id)

    def mark_embot(self, embot_id: str) -> None:
        if self.status == "exporting":
            self.dirty_embots.add(embot_id)
            self.changed_embots.add(embot_id)

    def meta(self) -> dict[str, object]:
        """What is kept besides the elements and embots themselves."""
        return {
            "status": self.status,
            "migration_id": self.migration_id,
            "epoch": self.epoch,
            "manifest": [r.model_dump(mode="json") for r in self.manifest],
            "dirty_elements": sorted(self.dirty_elements),
            "dirty_embots": sorted(self.dirty_embots),
            "changed_elements": sorted(self.changed_elements),
            "changed_embots": sorted(self.changed_embots),
            "dirty_round": self.dirty_round,
            "recent_at_export": self.recent_at_export,
            "recent_at_round": self.recent_at_round,
        }

    @classmethod
    def restore(cls, vm_id: str, meta: dict[str, Any], elements: list[Element], embots: list[Embot],
                recent: list[str], recent_next: int) -> VmPlane:
        plane = cls.from_graph(
            ManagementGraph(vm_id=vm_id, elements=elements, embots=embots,
                            manifest=[ModuleRef.model_validate(r) for r in meta["manifest"]],
                            recent_event_ids=recent[-RECENT_IDS:]),
            meta["status"],
            meta.get("migration_id"),
        )
        plane.recent = OrderedDict.fromkeys(recent)
        plane.recent_next = recent_next
        plane.epoch = int(meta.get("epoch", 0))
        plane.dirty_elements = set(meta.get("dirty_elements", []))
        plane.dirty_embots = set(meta.get("dirty_embots", []))
        plane.changed_elements = set(meta.get("changed_elements", []))
        plane.changed_embots = set(meta.get("changed_embots", []))
        plane.dirty_round = int(meta.get("dirty_round", 0))
        plane.recent_at_export = int(meta.get("recent_at_export", 0))
        plane.recent_at_round = int(meta.get("recent_at_round", 0))
        return plane


Fired = tuple[str, str, str, Effect]  # element id, embot id, policy name, effect


def apply_event(engine: PolicyEngine, plane: VmPlane, event: Event) -> list[Fired]:
    """Run every policy that watches ``event``'s element; state changes happen here, in place.

    Alarms are state too (an alarm raised is remembered, raised once); the effects
    returned are what must leave the host: alarm notices, emitted events, migrate requests.
    """
    element = plane.elements.get(event.element_id)
    if element is None:
        return []
    ev = {"id": event.id, "kind": event.kind, "ts": event.ts, "element_id": event.element_id, "data": event.data}
    el = {"id": element.id, "type": element.type, "attributes": element.attributes}
    out: list[Fired] = []
    for embot_id in plane.by_element.get(event.element_id, ()):
        state = plane.state[embot_id]
        for policy in plane.embots[embot_id].policies:
            try:
                effects = engine.run(policy, ev, el, state)
            except PolicyError:
                state["policy_errors"] = int(state.get("policy_errors", 0)) + 1  # type: ignore[call-overload]
                continue
            for effect in effects:
                if _apply_alarm(state, policy.name, element.id, effect):
                    out.append((element.id, embot_id, policy.name, effect))
        plane.mark_embot(embot_id)
    return out


def _apply_alarm(state: dict[str, object], policy: str, element_id: str, effect: Effect) -> bool:
    """Update the alarm state; False when there is nothing more to do for ``effect``."""
    if effect.kind not in ("alarm", "clear_alarm"):
        return True
    alarms = state.setdefault("alarms", {})
    assert isinstance(alarms, dict)
    name = effect.key or policy
    if effect.kind == "clear_alarm":
        alarms.pop(name, None)
        return False
    if name in alarms:
        return False  # already raised: an alarm is a state, not a stream
    alarms[name] = {"element": element_id, "detail": effect.value}
    return True


def check_graph(graph: ManagementGraph, modules: ModuleRegistry, engine: PolicyEngine) -> None:
    """Rebuild-time checks: types resolve, dependencies exist and are acyclic, policies compile."""
    elements = {e.id: e for e in graph.elements}
    if len(elements) != len(graph.elements):
        raise GraphError("duplicate element ids")
    if graph.vm_id not in elements:
        raise GraphError(f"the VM element {graph.vm_id!r} is missing")
    manifest = {r.key for r in graph.manifest}
    for e in graph.elements:
        if e.vm_id != graph.vm_id:
            raise GraphError(f"element {e.id!r} belongs to vm {e.vm_id!r}")
        if e.module not in manifest:
            raise TypeResolutionError(f"element {e.id!r}: module {e.module} is not in the manifest")
        module = modules.get(e.module)
        if module is None or e.type not in module.element_types:
            raise TypeResolutionError(f"element {e.id!r}: type {e.type!r} is not defined by {e.module}")
        for d in e.depends_on:
            if d not in elements:
                raise GraphError(f"element {e.id!r} depends on unknown element {d!r}")
    _check_acyclic(elements)
    for b in graph.embots:
        if b.module not in manifest:
            raise TypeResolutionError(f"embot {b.id!r}: module {b.module} is not in the manifest")
        for eid in b.elements:
            if eid not in elements:
                raise GraphError(f"embot {b.id!r} manages unknown element {eid!r}")
        for p in b.policies:
            try:
                engine.check(p)
            except PolicyError as exc:
                raise GraphError(f"embot {b.id!r} policy {p.name!r}: {exc}") from None


def _check_acyclic(elements: dict[str, Element]) -> None:
    depth: dict[str, int] = {}
    for start in elements:
        if start in depth:
            continue
        # iterative DFS so a hostile chain cannot exhaust the stack
        stack: list[tuple[str, int]] = [(start, 0)]
        on_path: list[str] = []
        in_path: set[str] = set()
        while stack:
            node, i = stack.pop()
            if i == 0:
                if node in in_path:
                    raise GraphError(f"dependency cycle through {node!r}")
                on_path.append(node)
                in_path.add(node)
                if len(on_path) > MAX_DEPTH:
                    raise GraphError(f"dependencies nested deeper than {MAX_DEPTH}")
            deps = elements[node].depends_on
            if i < len(deps):
                stack.append((node, i + 1))
                child = deps[i]
                if child in in_path:
                    raise GraphError(f"dependency cycle through {child!r}")
                if child not in depth:
                    stack.append((child, 0))
            else:
                depth[node] = 1 + max((depth.get(c, 0) for c in deps), default=0)
                if depth[node] > MAX_DEPTH:  # a chain met part by part, from its shallow end
                    raise GraphError(f"dependencies nested deeper than {MAX_DEPTH}")
                on_path.pop()
                in_path.discard(node)
