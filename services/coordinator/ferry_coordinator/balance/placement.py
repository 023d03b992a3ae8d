"""Where a VM may go: the interface the balancer asks, and a capacity-only implementation.

The coordinator's placement (filters for capacity, cordons, selectors, anti-affinity and
driver kind; weights) plugs in through :class:`Placement`. :class:`CapacityPlacement` is the
simplest one that is right about capacity, for the tests and the simulation bench.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .metric import utilisation
from .model import Fleet, VmLoad


class Placement(Protocol):
    """Ranks the hosts that could take a VM."""

    def targets(self, vm: VmLoad, source: str, fleet: Fleet) -> Sequence[str]:
        """Hosts of ``fleet`` that can take ``vm`` (now on ``source``), best first; never ``source``."""
        ...


@dataclass(frozen=True)
class CapacityPlacement:
    """Feasible: not the source, not cordoned, memory fits (allocations and reservations), and
    the CPU in use after the move stays within ``cpu_ceiling`` of the host's cores.
    Ranked by utilisation after the move, least first."""

    cpu_ceiling: float = 1.0

    def targets(self, vm: VmLoad, source: str, fleet: Fleet) -> Sequence[str]:
        ranked: list[tuple[float, str]] = []
        for h in fleet.hosts:
            if h.host == source or h.cordoned or h.free_mib < vm.memory_mib:
                continue
            if h.cpu_used + vm.cpu > h.cpus * self.cpu_ceiling:
                continue
            after = utilisation(h.cpu_used + vm.cpu, h.memory_used + vm.memory_used_mib, h.cpus, h.memory_mib)
            ranked.append((after, h.host))
        ranked.sort()
        return [name for _, name in ranked]
