"""A drain's plan: each VM of the host, where it goes, in which order, and when it will have
left; and, named at once, the VMs that cannot move (no host fits, with each host's reason,
or pinned by policy). Pure: ``--dry-run`` prints it and changes nothing.

Largest VMs first (first-fit decreasing: the big ones find room while there is most of it);
each placed VM's memory is reserved on its target in a copy of the fleet view, so the plan
never puts more on a host than it holds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from ferry_common.messages.domain import VmSpec

from .placement import Demand, place
from .view import FleetView

DEFAULT_MIBPS = 1024.0  # what a migration moves per second before any was measured


@dataclass(frozen=True)
class PlannedVm:
    vm_id: str
    memory_mib: int
    target: str | None  # None: cannot move (reason says why)
    candidates: tuple[str, ...] = ()
    order: int = 0
    estimate_s: float = 0.0  # from the drain's start until it has left
    reason: str | None = None


def pinned(vm: VmSpec) -> str | None:
    """Why policy keeps ``vm`` where it is (its param ``pinned: true``), or None."""
    return "pinned by policy (pinned: true)" if vm.params.get("pinned") is True else None


def per_vm_s(vm: VmSpec, measured: Sequence[float]) -> float:
    """One migration's expected time: the measured mean once there is one, else by size."""
    if measured:
        return sum(measured) / len(measured)
    return max(0.1, vm.memory_mib / DEFAULT_MIBPS)


def plan_drain(
    host: str,
    vms: Iterable[VmSpec],
    view: FleetView,
    *,
    parallel: int,
    measured: Sequence[float] = (),
    exclude: dict[str, Sequence[str]] | None = None,
) -> tuple[list[PlannedVm], list[PlannedVm]]:
    """``(movable in order, unmovable)`` for draining ``host`` of ``vms``, ``parallel``
    migrations at a time. ``exclude``: per VM, hosts already tried."""
    # a copy: the plan's reservations are its own
    sim = FleetView([replace(h, groups=Counter(h.groups), incoming_groups=Counter(h.incoming_groups)) for h in view.values()])
    if host in sim.hosts:
        sim.cordon(host, draining=True)
    movable: list[PlannedVm] = []
    stuck: list[PlannedVm] = []
    for vm in sorted(vms, key=lambda v: (-v.memory_mib, v.vm_id)):
        why = pinned(vm)
        if why is not None:
            stuck.append(PlannedVm(vm.vm_id, vm.memory_mib, None, reason=why))
            continue
        demand = Demand.of(vm, host)
        found = place(demand, sim.values(), exclude=(exclude or {}).get(vm.vm_id, ()))
        if not found.fits:
            stuck.append(PlannedVm(vm.vm_id, vm.memory_mib, None, reason=f"no host fits: {found.explanation()}"))
            continue
        target = found.ranked[0]
        sim.reserve(target, vm.memory_mib, demand.anti_affinity)
        order = len(movable)
        wave_end = (order // max(1, parallel) + 1) * per_vm_s(vm, measured)
        movable.append(PlannedVm(vm.vm_id, vm.memory_mib, target, found.ranked, order, wave_end))
    return movable, stuck
