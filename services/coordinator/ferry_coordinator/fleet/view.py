"""The fleet as placement sees it: each host's capacity, use, labels and condition.

Built from the hosts' inventories and kept current by the coordinator: an inventory replaces
what the host reports (capacity, VMs, labels, driver), while reservations, inbound migrations
and the condition (cordoned, draining, not ready) are the coordinator's own overlay.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from ferry_common.messages.public import HostInventory


class HostCondition(StrEnum):
    """Whether placement may choose a host, the most telling first (see HostView.condition)."""

    READY = "ready"
    CORDONED = "cordoned"  # an operator said no new VMs
    DRAINING = "draining"  # being emptied
    NOT_READY = "not_ready"  # its heartbeats stopped


@dataclass(slots=True)
class HostView:
    name: str
    driver: str
    capacity_mib: int
    used_mib: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    reserved_mib: int = 0  # memory promised to migrations on their way in
    inbound: int = 0  # migrations in flight towards it
    # three independent facts: a cordoned host that stops answering is both, and when it
    # answers again it is still cordoned
    ready: bool = True  # liveness: its heartbeats arrive
    cordoned: bool = False
    draining: bool = False
    groups: Counter[str] = field(default_factory=Counter)  # anti-affinity groups of its VMs
    incoming_groups: Counter[str] = field(default_factory=Counter)  # ...and of those on their way
    vms: int = 0

    @property
    def free_mib(self) -> int:
        return self.capacity_mib - self.used_mib - self.reserved_mib

    @property
    def schedulable(self) -> bool:
        return self.ready and not self.cordoned and not self.draining

    @property
    def condition(self) -> HostCondition:
        if not self.ready:
            return HostCondition.NOT_READY
        if self.draining:
            return HostCondition.DRAINING
        return HostCondition.CORDONED if self.cordoned else HostCondition.READY


def host_from(inv: HostInventory) -> HostView:
    """What ``inv`` says of its host (no overlay)."""
    groups: Counter[str] = Counter()
    for vm in inv.vms:
        if vm.placement is not None:
            groups.update(vm.placement.anti_affinity)
    return HostView(
        name=inv.host,
        driver=inv.driver,
        capacity_mib=inv.capacity_mib,
        used_mib=sum(vm.memory_mib for vm in inv.vms),
        labels=dict(inv.labels),
        groups=groups,
        vms=len(inv.vms),
    )


class FleetView:
    """Every known host, by name; cheap to update one host at a time."""

    def __init__(self, hosts: Iterable[HostView] = ()) -> None:
        self.hosts: dict[str, HostView] = {h.name: h for h in hosts}

    @classmethod
    def from_inventories(cls, inventories: Iterable[HostInventory]) -> FleetView:
        return cls(host_from(inv) for inv in inventories)

    def update(self, inv: HostInventory) -> HostView:
        """Take ``inv``'s report, keeping the coordinator's overlay for that host."""
        new = host_from(inv)
        old = self.hosts.get(inv.host)
        if old is not None:
            new.reserved_mib, new.inbound = old.reserved_mib, old.inbound
            new.incoming_groups = old.incoming_groups
            new.ready, new.cordoned, new.draining = old.ready, old.cordoned, old.draining
        self.hosts[inv.host] = new
        return new

    def set_ready(self, host: str, ready: bool) -> None:
        """A liveness listener: ``LivenessTracker(on_change=view.set_ready)``."""
        h = self.hosts.get(host)
        if h is not None:
            h.ready = ready

    def cordon(self, host: str, *, cordoned: bool = True, draining: bool | None = None) -> None:
        h = self.hosts[host]
        h.cordoned = cordoned
        if draining is not None:
            h.draining = draining

    def reserve(self, host: str, memory_mib: int, groups: Iterable[str] = ()) -> None:
        """A migration towards ``host`` started: its memory is promised, one more inbound, and
        its anti-affinity groups count there already (two of a group moving at once must not
        land together)."""
        h = self.hosts[host]
        h.reserved_mib += memory_mib
        h.inbound += 1
        h.incoming_groups.update(groups)

    def unreserve(self, host: str, memory_mib: int, groups: Iterable[str] = ()) -> None:
        """The migration ended; the next inventory says whether the VM is there."""
        h = self.hosts.get(host)
        if h is not None:
            h.reserved_mib = max(0, h.reserved_mib - memory_mib)
            h.inbound = max(0, h.inbound - 1)
            h.incoming_groups.subtract(groups)
            h.incoming_groups += Counter()  # drop the counts that fell to zero

    def values(self) -> list[HostView]:
        return list(self.hosts.values())
