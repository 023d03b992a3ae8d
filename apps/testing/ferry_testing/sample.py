"""The demo's management plane, for demos, tests and benchmarks: ``examples/web-server.yaml``.

Three modules, one depending on another: ``ferry.core`` (element types),
``ferry.metrics`` (depends on core) and ``ferry.load`` (depends on metrics; the
policies). A target that lacks ``ferry.load`` fetches it, and ``ferry.metrics``
after it, from the source.
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

from ferry_common.messages.domain import Element, Event, ManagementGraph, Module, Policy, VmSpec
from ferry_common.messages.plane import PlaneDocument
from ferry_common.planes.convert import modules_of, retarget, to_graph
from ferry_common.planes.loader import load_plane

SAMPLE_FILE = "web-server.yaml"


def examples_dir() -> Path:
    """``examples/`` of the source tree, or where an installed Ferry put it (share/ferry)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "examples" / SAMPLE_FILE).is_file():
            return parent / "examples"
    return Path(sys.prefix) / "share" / "ferry" / "examples"


@cache
def document() -> PlaneDocument:
    return load_plane(examples_dir() / SAMPLE_FILE)


MODULES: list[Module] = modules_of(document(), lambda key: None)
CORE, METRICS, LOAD = MODULES


def _policy(name: str) -> Policy:
    return next(p for p in LOAD.policies if p.name == name)


HIGH_LOAD = _policy("count-high-load")
LOAD_ALARM = _policy("alarm-on-sustained-load")
TRACK_LAST = _policy("remember-last-event")
DISK_ERRORS = _policy("disk-errors")


def vm_spec(vm_id: str, *, memory_mib: int = 2048, **params: object) -> VmSpec:
    return VmSpec(vm_id=vm_id, memory_mib=memory_mib, vcpus=2, params=dict(params))


def graph(vm_id: str, *, extra_elements: int = 0) -> ManagementGraph:
    """The example's plane for ``vm_id``, and ``extra_elements`` more services on the VM,
    watched by its services' embot."""
    g, _ = to_graph(retarget(document(), vm_id), {m.ref().key: m for m in MODULES}.get)
    if not extra_elements:
        return g
    core = CORE.ref().key
    extra = [Element(id=f"{vm_id}.m{i}", vm_id=vm_id, type="service", module=core, depends_on=[vm_id])
             for i in range(extra_elements)]
    embots = [b.model_copy(update={"elements": [*b.elements, *(e.id for e in extra)]})
              if b.id == f"{vm_id}.services" else b for b in g.embots]
    return g.model_copy(update={"elements": [*g.elements, *extra], "embots": embots})


def event(vm_id: str, n: int, ts: float, *, element: str | None = None) -> Event:
    """The n-th event of a deterministic stream: load samples, with a disk error now and then."""
    if n % 7 == 3:
        return Event(id=f"{vm_id}-e{n}", vm_id=vm_id, element_id=element or f"{vm_id}.disk0", kind="disk.error",
                     ts=ts, data={"code": n})
    value = 0.9 if n % 3 == 0 else 0.4
    return Event(id=f"{vm_id}-e{n}", vm_id=vm_id, element_id=element or vm_id, kind="cpu.load", ts=ts,
                 data={"value": value})
