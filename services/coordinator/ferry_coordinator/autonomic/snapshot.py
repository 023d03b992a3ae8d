"""The balancer's inputs, built from what the coordinator knows: a :class:`Fleet` from the
hosts' inventories (where each VM runs) and their load samples (``HostLoad``), the queue's
work in flight, and a :class:`Placement` that applies the coordinator's placement filters."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ferry_common.messages import host_events as he
from ferry_common.messages.domain import VmSpec

from ..balance import CapacityPlacement, Fleet, HostLoad, VmLoad, WorkInFlight
from ..fleet.placement import Demand, place
from ..fleet.queue import Priority, QueueEntry
from ..fleet.view import FleetView, HostView
from ..hosts import HostRegistry

#: the VM parameter that overrides the cluster's automation level for one VM
LEVEL_PARAM = "automation_level"


@dataclass(frozen=True)
class Snapshot:
    fleet: Fleet
    work: WorkInFlight
    specs: Mapping[str, VmSpec]
    view: FleetView


def build(
    registry: HostRegistry,
    loads: Mapping[str, he.HostLoad],
    entries: Iterable[QueueEntry],
    *,
    ready: Mapping[str, bool],
    cordoned: Iterable[str] = (),
    guests: Mapping[str, he.GuestLoad] | None = None,
) -> Snapshot:
    """The fleet as sampled now. A host counts once both its inventory and a load sample
    arrived; a host not ready or cordoned (faulty, draining) takes nothing. ``guests``: each
    VM's last sample from any host, for a VM that just moved and no sample lists yet (it
    would count as idle where it arrived, and draw more moves there)."""
    live = [e for e in entries if e.live]
    off = set(cordoned) | {h for h, ok in ready.items() if not ok}
    guest: dict[str, he.GuestLoad] = {**(guests or {}), **{g.vm_id: g for s in loads.values() for g in s.vms}}
    # one host per VM: inventories cross during a switch-over (the target's says it runs, the
    # source's has not said it left), and where a saga just moved it is the registry's call
    where: dict[str, str] = {}
    for host, vm_ids in registry.placement().items():
        for vm_id in vm_ids:
            if vm_id in where:
                located = registry.locate(vm_id)
                where[vm_id] = located[0] if located else where[vm_id]
            else:
                where[vm_id] = host
    placement: dict[str, list[str]] = {}
    for vm_id, host in where.items():
        placement.setdefault(host, []).append(vm_id)
    specs: dict[str, VmSpec] = {vm.vm_id: vm for inv in registry.hosts.values() for vm in inv.vms}
    reserved: dict[str, int] = {}
    for e in live:
        if e.target_host and e.state.value == "started" and e.vm_id in specs:
            reserved[e.target_host] = reserved.get(e.target_host, 0) + specs[e.vm_id].memory_mib
    hosts = []
    for name, sample in sorted(loads.items()):
        if name not in registry.hosts:
            continue
        vms = []
        for vm_id in sorted(placement.get(name, [])):
            spec = specs.get(vm_id)
            if spec is None:
                continue
            g = guest.get(vm_id)
            vms.append(VmLoad(vm_id, spec.memory_mib, spec.vcpus, g.cpu if g else 0.0,
                              g.memory_used_mib if g else float(spec.memory_mib)))
        hosts.append(HostLoad(name, sample.cpus, sample.memory_mib, tuple(vms), reserved.get(name, 0),
                              cordoned=name in off))
    automatic = frozenset(e.vm_id for e in live if e.priority == Priority.REBALANCE)
    other = frozenset(e.vm_id for e in live if e.priority != Priority.REBALANCE)
    view = FleetView.from_inventories(registry.hosts.values())
    for h in view.values():
        h.ready = ready.get(h.name, True)
        h.cordoned = h.name in off
        h.reserved_mib = reserved.get(h.name, 0)
    return Snapshot(Fleet.of(hosts), WorkInFlight(automatic, other, busy=bool(other)), specs, view)


@dataclass(frozen=True)
class FilteredPlacement:
    """The balancer's targets: capacity and CPU from the load snapshot (:class:`CapacityPlacement`),
    kept only where the coordinator's placement filters (driver, readiness, cordons, host
    selector, anti-affinity, memory) let the VM go."""

    view: FleetView
    specs: Mapping[str, VmSpec]

    def targets(self, vm: VmLoad, source: str, fleet: Fleet) -> Sequence[str]:
        spec = self.specs.get(vm.vm_id)
        if spec is None:
            return []
        allowed = set(place(Demand.of(spec, source), self.view.values()).ranked)
        return [h for h in CapacityPlacement().targets(vm, source, fleet) if h in allowed]


def ranked_targets(spec: VmSpec, source: str, hosts: list[HostView]) -> tuple[tuple[str, ...], str | None]:
    """Placement's targets for ``spec`` leaving ``source``, and why none fits when so."""
    p = place(Demand.of(spec, source), hosts)
    return p.ranked, (None if p.fits else p.explanation())
