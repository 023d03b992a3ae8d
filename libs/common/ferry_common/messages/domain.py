"""What a management plane holds and moves: elements, embots, policies, modules, events."""

from __future__ import annotations

import hashlib
from typing import Literal

import orjson
from pydantic import Field

from .base import Wire
from .limits import (
    MAX_ACTIONS,
    MAX_DEPENDS,
    MAX_ELEMENTS,
    MAX_EMBOTS,
    MAX_MODULES,
    MAX_POLICIES,
    MAX_RECENT_IDS,
    Digest,
    Expression,
    JsonObject,
    Name,
    Trigger,
)


class ModuleRef(Wire):
    """A management module named by version and content digest."""

    name: Name
    version: Name
    digest: Digest

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"


class Action(Wire):
    """What a policy does when its condition holds. ``value`` is a CEL expression."""

    kind: Literal["set", "increment", "alarm", "clear_alarm", "emit", "migrate"]
    key: Name | None = None
    value: Expression | None = None
    target_host: Name | None = None


class Policy(Wire):
    """Data, not code: a trigger (event kinds), a CEL condition, and actions."""

    name: Name
    trigger: list[Trigger] = Field(min_length=1, max_length=16)
    condition: Expression = "true"
    actions: list[Action] = Field(default_factory=list, max_length=MAX_ACTIONS)


class Module(Wire):
    """A versioned, content-addressed definition of element types and policy templates."""

    name: Name
    version: Name
    depends: list[ModuleRef] = Field(default_factory=list, max_length=MAX_DEPENDS)
    element_types: list[Name] = Field(default_factory=list, max_length=256)
    policies: list[Policy] = Field(default_factory=list, max_length=MAX_POLICIES)

    def digest(self) -> str:
        """sha256 over the canonical JSON of the module's content."""
        raw = orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(raw).hexdigest()

    def ref(self) -> ModuleRef:
        return ModuleRef(name=self.name, version=self.version, digest=self.digest())


class Element(Wire):
    """A managed element: the VM itself or something it contains or uses."""

    id: Name
    vm_id: Name
    type: Name
    module: Name  # "name@version" of the module that defines ``type``
    depends_on: list[Name] = Field(default_factory=list, max_length=MAX_DEPENDS)
    attributes: JsonObject = Field(default_factory=dict)


class Embot(Wire):
    """An autonomic element: the policies for some elements and the state they keep."""

    id: Name
    module: Name
    elements: list[Name] = Field(min_length=1, max_length=MAX_DEPENDS)
    policies: list[Policy] = Field(default_factory=list, max_length=MAX_POLICIES)
    state: JsonObject = Field(default_factory=dict)


class Event(Wire):
    """A service-plane event for one element of one VM."""

    id: Name
    vm_id: Name
    element_id: Name
    kind: Name
    ts: float = Field(description="When it happened (seconds); dispatch is in this order.")
    data: JsonObject = Field(default_factory=dict)


class ManagementGraph(Wire):
    """The management plane of one VM: its elements, embots and the modules they need."""

    vm_id: Name
    elements: list[Element] = Field(default_factory=list, max_length=MAX_ELEMENTS)
    embots: list[Embot] = Field(default_factory=list, max_length=MAX_EMBOTS)
    manifest: list[ModuleRef] = Field(default_factory=list, max_length=MAX_MODULES)
    recent_event_ids: list[Name] = Field(default_factory=list, max_length=MAX_RECENT_IDS)


class VmPlacement(Wire):
    """Where a VM may run: its labels, the host labels it needs, its anti-affinity groups
    (no two VMs of a group on one host). Data for the coordinator's placement."""

    labels: dict[Name, Name] = Field(default_factory=dict, max_length=64)
    host_selector: dict[Name, Name] = Field(default_factory=dict, max_length=64)
    anti_affinity: list[Name] = Field(default_factory=list, max_length=16)


class VmSpec(Wire):
    """A VM as the hypervisor adapter knows it."""

    vm_id: Name
    memory_mib: int = Field(ge=1, le=4 * 1024 * 1024)
    vcpus: int = Field(default=1, ge=1, le=1024)
    driver: Name = "sim"
    params: JsonObject = Field(default_factory=dict)
    placement: VmPlacement | None = None  # None: anywhere its driver runs
