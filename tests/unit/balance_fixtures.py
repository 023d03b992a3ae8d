"""Small fleets for the balancer's tests: CPU-dominated hosts, VMs named by their load."""

from __future__ import annotations

from ferry_coordinator.balance import Fleet, HostLoad, VmLoad

CPUS = 16
MIB = 64 * 1024


def vm(vm_id: str, cpu: float, memory_mib: int = 2048) -> VmLoad:
    return VmLoad(vm_id, memory_mib, 4, cpu, 256.0)


def fleet(layout: dict[str, list[VmLoad]], reserved: dict[str, int] | None = None) -> Fleet:
    reserved = reserved or {}
    return Fleet.of(HostLoad(h, CPUS, MIB, tuple(vms), reserved.get(h, 0)) for h, vms in layout.items())


def lopsided() -> Fleet:
    """Four hosts, all the load on the first: far over any threshold, many good moves."""
    return fleet({
        "h1": [vm(f"v{i}", 2.0) for i in range(6)],
        "h2": [vm("w1", 1.0)],
        "h3": [vm("w2", 1.0)],
        "h4": [vm("w3", 1.0)],
    })
