"""Where a VM can go: filters, then weights, or a reason per host when nothing fits.

Pure and typed: ``place(demand, hosts)`` reads a snapshot of the fleet and returns the ranked
targets. Filters (in this order, the first that refuses a host is its reason): the same driver
kind, the host ready (not cordoned, draining or not ready), the VM's host selector, its
anti-affinity groups, enough free memory (capacity minus use minus reservations). Weights, as
Nova's weighers: each normalised over the candidates to [0, 1] and summed with a multiplier;
most free memory after the move, fewest migrations in flight inbound.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

from ferry_common.messages.domain import VmSpec

from .view import HostCondition, HostView


@dataclass(frozen=True, slots=True)
class Demand:
    """What a VM needs of a host."""

    vm_id: str
    memory_mib: int
    driver: str
    source_host: str | None = None
    host_selector: Mapping[str, str] = field(default_factory=dict)
    anti_affinity: frozenset[str] = frozenset()

    @classmethod
    def of(cls, vm: VmSpec, source_host: str | None) -> Demand:
        p = vm.placement
        return cls(
            vm_id=vm.vm_id,
            memory_mib=vm.memory_mib,
            driver=vm.driver,
            source_host=source_host,
            host_selector=dict(p.host_selector) if p else {},
            anti_affinity=frozenset(p.anti_affinity) if p else frozenset(),
        )


@dataclass(frozen=True, slots=True)
class Weights:
    """Multipliers of the weighers (0 turns one off)."""

    free_memory: float = 1.0
    fewer_inbound: float = 1.0


@dataclass(frozen=True)
class Placement:
    """The targets that fit, best first, and why each other host does not."""

    ranked: tuple[str, ...]
    rejected: Mapping[str, str]

    @property
    def fits(self) -> bool:
        return bool(self.ranked)

    def explanation(self) -> str:
        """``"host-b: insufficient memory; host-c: cordoned"``, hosts by name."""
        return "; ".join(f"{h}: {why}" for h, why in sorted(self.rejected.items()))


Filter = Callable[[HostView, Demand], str | None]


def same_driver(h: HostView, d: Demand) -> str | None:
    return None if h.driver == d.driver else f"driver {h.driver}, not {d.driver}"


def ready(h: HostView, d: Demand) -> str | None:
    condition = h.condition
    if condition is HostCondition.READY:
        return None
    return "not ready" if condition is HostCondition.NOT_READY else condition.value


def selector(h: HostView, d: Demand) -> str | None:
    missing = [f"{k}={v}" for k, v in d.host_selector.items() if h.labels.get(k) != v]
    return f"labels do not match {','.join(missing)}" if missing else None


def anti_affinity(h: HostView, d: Demand) -> str | None:
    clash = sorted(g for g in d.anti_affinity if h.groups.get(g, 0) > 0 or h.incoming_groups.get(g, 0) > 0)
    return f"anti-affinity group {','.join(clash)} already there" if clash else None


def capacity(h: HostView, d: Demand) -> str | None:
    free = h.free_mib
    return None if free >= d.memory_mib else f"insufficient memory ({free} MiB free, {d.memory_mib} needed)"


FILTERS: tuple[Filter, ...] = (same_driver, ready, selector, anti_affinity, capacity)


def why_not(h: HostView, d: Demand) -> str | None:
    """The first filter's reason for refusing ``h``, or None if it fits."""
    if h.name == d.source_host:
        return "the VM's own host"
    for f in FILTERS:
        reason = f(h, d)
        if reason is not None:
            return reason
    return None


def place(
    demand: Demand,
    hosts: Iterable[HostView],
    *,
    weights: Weights = Weights(),  # noqa: B008 - frozen, never mutated
    exclude: Collection[str] = (),
    limit: int | None = None,
) -> Placement:
    """The hosts ``demand`` fits on, best first (the ``limit`` best, if given); or, if none
    fits, each host's reason.

    ``exclude``: hosts already tried (a target that denied admission), reported as such.
    """
    hosts = hosts if isinstance(hosts, list) else list(hosts)
    # the fast path: the filters inlined, in FILTERS' order (why_not says the same, slower)
    mem, drv, src = demand.memory_mib, demand.driver, demand.source_host
    sel = tuple(demand.host_selector.items())
    groups = demand.anti_affinity
    fit: list[HostView] = []
    for h in hosts:
        if (
            h.driver == drv
            and h.ready
            and not h.cordoned
            and not h.draining
            and h.capacity_mib - h.used_mib - h.reserved_mib >= mem
            and h.name != src
            and (not sel or all(h.labels.get(k) == v for k, v in sel))
            and (not groups or not any(h.groups.get(g, 0) or h.incoming_groups.get(g, 0) for g in groups))
            and h.name not in exclude
        ):
            fit.append(h)
    if not fit:
        rejected = {}
        for h in hosts:
            rejected[h.name] = "tried already" if h.name in exclude else (why_not(h, demand) or "tried already")
        return Placement((), rejected)
    return Placement(tuple(h.name for h in rank(fit, mem, weights, limit)), {})


def rank(fit: list[HostView], memory_mib: int, weights: Weights, limit: int | None = None) -> list[HostView]:
    """``fit`` best first: normalised free memory after the move, minus normalised inbound."""
    free = [h.capacity_mib - h.used_mib - h.reserved_mib - memory_mib for h in fit]
    lo, hi = min(free), max(free)
    span = (hi - lo) or 1
    most_in = max(h.inbound for h in fit) or 1
    wm, wi = weights.free_memory, weights.fewer_inbound
    scored = [
        (-(wm * (f - lo) / span - wi * h.inbound / most_in), h.name, h)
        for f, h in zip(free, fit, strict=True)
    ]
    best = heapq.nsmallest(limit, scored) if limit is not None else sorted(scored)
    return [h for _, _, h in best]
