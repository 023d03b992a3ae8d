"""The balance model: hosts, their capacity, and the load each VM puts on them.

A :class:`Fleet` is an immutable snapshot: the balancer computes on one snapshot and its
proposals name the inventory version (:func:`inventory_version`) they were computed on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field


class FleetError(ValueError):
    """A snapshot that cannot be balanced (a bad capacity, a VM on two hosts, ...)."""


@dataclass(frozen=True, slots=True)
class VmLoad:
    """One VM: what it holds (``memory_mib``, ``vcpus``) and its last load sample."""

    vm_id: str
    memory_mib: int
    vcpus: int
    cpu: float  # cores in use, averaged over the last sample
    memory_used_mib: float

    def __post_init__(self) -> None:
        if self.memory_mib <= 0 or self.vcpus <= 0:
            raise FleetError(f"vm {self.vm_id!r}: memory_mib and vcpus must be positive")
        if not (self.cpu >= 0 and self.memory_used_mib >= 0):  # also refuses NaN
            raise FleetError(f"vm {self.vm_id!r}: load samples must be non-negative numbers")


@dataclass(frozen=True, slots=True)
class Move:
    """Move ``vm_id`` from ``source`` to ``target``."""

    vm_id: str
    source: str
    target: str


@dataclass(frozen=True)
class HostLoad:
    """One host: its capacity, the VMs it runs, and memory already reserved by inbound moves."""

    host: str
    cpus: int
    memory_mib: int
    vms: tuple[VmLoad, ...] = ()
    reserved_mib: int = 0
    cordoned: bool = False  # placement skips it (draining, in maintenance, faulty)
    cpu_used: float = field(init=False)
    memory_used: float = field(init=False)
    allocated_mib: int = field(init=False)

    def __post_init__(self) -> None:
        if self.cpus <= 0 or self.memory_mib <= 0:
            raise FleetError(f"host {self.host!r}: cpus and memory_mib must be positive")
        if self.reserved_mib < 0:
            raise FleetError(f"host {self.host!r}: reserved_mib must not be negative")
        # frozen: the sums are computed once, here
        object.__setattr__(self, "cpu_used", sum(v.cpu for v in self.vms))
        object.__setattr__(self, "memory_used", sum(v.memory_used_mib for v in self.vms))
        object.__setattr__(self, "allocated_mib", sum(v.memory_mib for v in self.vms))

    @property
    def free_mib(self) -> int:
        """Memory not allocated to a VM nor reserved for one arriving."""
        return self.memory_mib - self.allocated_mib - self.reserved_mib


@dataclass(frozen=True)
class Fleet:
    """Every host of a cluster, as sampled at one moment."""

    hosts: tuple[HostLoad, ...]
    _by_host: dict[str, HostLoad] = field(init=False, repr=False, compare=False)
    _where: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_host: dict[str, HostLoad] = {}
        where: dict[str, str] = {}
        for h in self.hosts:
            if h.host in by_host:
                raise FleetError(f"host {h.host!r} appears twice")
            by_host[h.host] = h
            for vm in h.vms:
                if vm.vm_id in where:
                    raise FleetError(f"vm {vm.vm_id!r} is on both {where[vm.vm_id]!r} and {h.host!r}")
                where[vm.vm_id] = h.host
        object.__setattr__(self, "_by_host", by_host)
        object.__setattr__(self, "_where", where)

    @classmethod
    def of(cls, hosts: Iterable[HostLoad]) -> Fleet:
        return cls(tuple(hosts))

    def host(self, name: str) -> HostLoad:
        try:
            return self._by_host[name]
        except KeyError:
            raise FleetError(f"unknown host {name!r}") from None

    def locate(self, vm_id: str) -> tuple[HostLoad, VmLoad]:
        """The host running ``vm_id`` and its load."""
        try:
            host = self._by_host[self._where[vm_id]]
        except KeyError:
            raise FleetError(f"unknown vm {vm_id!r}") from None
        return host, next(v for v in host.vms if v.vm_id == vm_id)

    def with_move(self, move: Move) -> Fleet:
        """The fleet once ``move`` is done (the balancer plans several moves in one round)."""
        source, vm = self.locate(move.vm_id)
        if source.host != move.source:
            raise FleetError(f"vm {move.vm_id!r} is on {source.host!r}, not {move.source!r}")
        target = self.host(move.target)
        rebuilt = {
            source.host: _replace_vms(source, tuple(v for v in source.vms if v.vm_id != vm.vm_id)),
            target.host: _replace_vms(target, (*target.vms, vm)),
        }
        return Fleet(tuple(rebuilt.get(h.host, h) for h in self.hosts))


def _replace_vms(h: HostLoad, vms: tuple[VmLoad, ...]) -> HostLoad:
    return HostLoad(h.host, h.cpus, h.memory_mib, vms, h.reserved_mib, h.cordoned)


def inventory_version(fleet: Fleet) -> str:
    """A hash of the inventory: hosts, their capacity and state, and where each VM runs.

    Load figures are left out on purpose: they change with every sample, and a recommendation
    is stale when the fleet's shape changes (a VM moved, a host came or went), not when a
    sample moves by a percent. The figures a move was computed on travel in its reason.
    """
    digest = hashlib.sha256()
    for h in sorted(fleet.hosts, key=lambda h: h.host):
        digest.update(f"{h.host}|{h.cpus}|{h.memory_mib}|{int(h.cordoned)}\n".encode())
        for vm in sorted(h.vms, key=lambda v: v.vm_id):
            digest.update(f" {vm.vm_id}|{vm.memory_mib}|{vm.vcpus}\n".encode())
    return digest.hexdigest()[:32]
