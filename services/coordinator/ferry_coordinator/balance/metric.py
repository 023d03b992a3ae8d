"""The imbalance metric.

A host's *utilisation* is its dominant share: the larger of CPU in use over its cores and
memory in use over its memory (a host is as full as its fullest resource). The fleet's
*imbalance* is the coefficient of variation of the hosts' utilisations: their population
standard deviation over their mean. DRS and Watcher's workload-balance strategy use the
standard deviation; dividing by the mean makes the figure scale-free, so one threshold means
the same at 20 % and at 80 % mean load (0.3: the hosts typically within 30 % of the mean).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .model import HostLoad

# below this mean utilisation the fleet is idle: spreads there cost nobody anything, and a
# ratio to a mean near zero would magnify noise into "imbalance"
IDLE_MEAN = 0.05


def utilisation(cpu_used: float, memory_used: float, cpus: int, memory_mib: int) -> float:
    """Dominant share of one host."""
    return max(cpu_used / cpus, memory_used / memory_mib)


def host_utilisation(h: HostLoad) -> float:
    return utilisation(h.cpu_used, h.memory_used, h.cpus, h.memory_mib)


def imbalance(utilisations: Sequence[float]) -> float:
    """Coefficient of variation of ``utilisations`` (0 for fewer than two hosts or an idle fleet)."""
    return Spread.of(utilisations).value


@dataclass(frozen=True, slots=True)
class Spread:
    """Sums that give the imbalance, and the imbalance after changing two hosts in O(1)."""

    n: int
    total: float
    total_sq: float

    @classmethod
    def of(cls, utilisations: Sequence[float]) -> Spread:
        return cls(len(utilisations), math.fsum(utilisations), math.fsum(u * u for u in utilisations))

    @property
    def value(self) -> float:
        return _cv(self.n, self.total, self.total_sq)

    def after(self, old_a: float, new_a: float, old_b: float, new_b: float) -> float:
        """The imbalance once host a goes from ``old_a`` to ``new_a`` and b from ``old_b`` to ``new_b``."""
        total = self.total - old_a - old_b + new_a + new_b
        total_sq = self.total_sq - old_a * old_a - old_b * old_b + new_a * new_a + new_b * new_b
        return _cv(self.n, total, total_sq)


def _cv(n: int, total: float, total_sq: float) -> float:
    if n < 2:
        return 0.0
    mean = total / n
    if mean < IDLE_MEAN:
        return 0.0
    variance = max(0.0, total_sq / n - mean * mean)  # rounding can push it a hair below 0
    return math.sqrt(variance) / mean
