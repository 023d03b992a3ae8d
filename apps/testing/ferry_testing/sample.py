"""A realistic management graph for demos, tests and benchmarks.

Three modules, one depending on another: ``ferry.core`` (element types),
``ferry.metrics`` (depends on core) and ``ferry.load`` (depends on metrics; the
policies). A target that lacks ``ferry.load`` fetches it, and ``ferry.metrics``
after it, from the source.
"""

from __future__ import annotations

from ferry_common.messages.domain import (
    Action,
    Element,
    Embot,
    Event,
    ManagementGraph,
    Module,
    Policy,
    VmSpec,
)

CORE = Module(name="ferry.core", version="1.0", element_types=["vm", "disk", "nic", "service"])
METRICS = Module(name="ferry.metrics", version="2.1", depends=[CORE.ref()], element_types=["meter"])
LOAD = Module(
    name="ferry.load",
    version="1.3",
    depends=[METRICS.ref()],
    policies=[],
)
MODULES = [CORE, METRICS, LOAD]

HIGH_LOAD = Policy(
    name="count-high-load",
    trigger=["cpu.load"],
    condition="event.data.value > 0.8",
    actions=[
        Action(kind="increment", key="high_samples"),
        Action(kind="set", key="last_high", value="event.data.value"),
    ],
)
LOAD_ALARM = Policy(
    name="alarm-on-sustained-load",
    trigger=["cpu.load"],
    condition="has(state.high_samples) && state.high_samples >= 3",
    actions=[Action(kind="alarm", key="sustained-load", value="{'samples': state.high_samples}")],
)
TRACK_LAST = Policy(
    name="remember-last-event",
    trigger=["*"],
    condition="true",
    actions=[Action(kind="set", key="last_event", value="event.id"), Action(kind="increment", key="seen")],
)
DISK_ERRORS = Policy(
    name="disk-errors",
    trigger=["disk.error"],
    actions=[Action(kind="increment", key="errors"), Action(kind="alarm", key="disk-error", value="event.data")],
)


def vm_spec(vm_id: str, *, memory_mib: int = 2048, **params: object) -> VmSpec:
    return VmSpec(vm_id=vm_id, memory_mib=memory_mib, vcpus=2, params=dict(params))


def graph(vm_id: str, *, disks: int = 2, nics: int = 2, services: int = 3, extra_elements: int = 0) -> ManagementGraph:
    """The VM element, its dependents, and embots watching them."""
    core, load = CORE.ref().key, LOAD.ref().key
    elements = [Element(id=vm_id, vm_id=vm_id, type="vm", module=core, attributes={"state": "running"})]
    for i in range(disks):
        elements.append(Element(id=f"{vm_id}.disk{i}", vm_id=vm_id, type="disk", module=core, depends_on=[vm_id],
                                attributes={"size_gib": 20 * (i + 1)}))
    for i in range(nics):
        elements.append(Element(id=f"{vm_id}.nic{i}", vm_id=vm_id, type="nic", module=core, depends_on=[vm_id],
                                attributes={"mac": f"52:54:00:00:00:{i:02x}"}))
    for i in range(services):
        deps = [f"{vm_id}.disk{i % max(disks, 1)}"] if disks else [vm_id]
        elements.append(Element(id=f"{vm_id}.svc{i}", vm_id=vm_id, type="service", module=core, depends_on=deps,
                                attributes={"name": f"svc-{i}"}))
    for i in range(extra_elements):
        elements.append(Element(id=f"{vm_id}.m{i}", vm_id=vm_id, type="service", module=core, depends_on=[vm_id]))
    embots = [
        Embot(id=f"{vm_id}.load", module=load, elements=[vm_id], policies=[HIGH_LOAD, LOAD_ALARM, TRACK_LAST]),
        Embot(id=f"{vm_id}.disks", module=load, elements=[e.id for e in elements if e.type == "disk"] or [vm_id],
              policies=[DISK_ERRORS, TRACK_LAST]),
        Embot(id=f"{vm_id}.services", module=load, elements=[e.id for e in elements if e.type == "service"] or [vm_id],
              policies=[TRACK_LAST]),
    ]
    return ManagementGraph(
        vm_id=vm_id, elements=elements, embots=embots, manifest=[CORE.ref(), LOAD.ref()]  # ferry.metrics comes in as a dependency
    )


def event(vm_id: str, n: int, ts: float, *, element: str | None = None) -> Event:
    """The n-th event of a deterministic stream: load samples, with a disk error now and then."""
    if n % 7 == 3:
        return Event(id=f"{vm_id}-e{n}", vm_id=vm_id, element_id=element or f"{vm_id}.disk0", kind="disk.error",
                     ts=ts, data={"code": n})
    value = 0.9 if n % 3 == 0 else 0.4
    return Event(id=f"{vm_id}-e{n}", vm_id=vm_id, element_id=element or vm_id, kind="cpu.load", ts=ts,
                 data={"value": value})
