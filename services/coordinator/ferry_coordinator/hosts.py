"""What the coordinator knows of hosts and where VMs run, from the adapters' inventories."""

from __future__ import annotations

from dataclasses import dataclass, field

from ferry_common.messages.domain import VmSpec
from ferry_common.messages.public import HostInventory, incoming_shape


@dataclass
class HostRegistry:
    hosts: dict[str, HostInventory] = field(default_factory=dict)
    seen_at: dict[str, float] = field(default_factory=dict)
    # placements the saga knows before the next inventory says so
    moved: dict[str, tuple[str, float]] = field(default_factory=dict)

    def update(self, inv: HostInventory, now: float) -> None:
        self.hosts[inv.host] = inv
        self.seen_at[inv.host] = now

    def known(self, host: str) -> bool:
        return host in self.hosts

    def ready_for(self, host: str, vm: VmSpec) -> bool:
        """Whether ``host`` said, in its last inventory, that it keeps a receiving process of
        ``vm``'s shape running (a hint: another migration may have taken it since)."""
        inv = self.hosts.get(host)
        return inv is not None and incoming_shape(vm.memory_mib, vm.vcpus) in inv.ready_incoming

    def locate(self, vm_id: str) -> tuple[str, VmSpec] | None:
        """The host running ``vm_id`` and its spec, preferring what a saga just did."""
        hint = self.moved.get(vm_id)
        spec = None
        for host, inv in self.hosts.items():
            for vm in inv.vms:
                if vm.vm_id == vm_id:
                    spec = vm
                    if hint is None or hint[0] == host:
                        return host, vm
        if hint is not None and spec is not None:
            return hint[0], spec
        return None

    def record_move(self, vm_id: str, host: str, now: float) -> None:
        self.moved[vm_id] = (host, now)

    def placement(self) -> dict[str, list[str]]:
        out = {h: [v.vm_id for v in inv.vms] for h, inv in self.hosts.items()}
        for vm_id, (host, _) in self.moved.items():
            for h, vms in out.items():
                if h != host and vm_id in vms:
                    vms.remove(vm_id)
            if host in out and vm_id not in out[host]:
                out[host].append(vm_id)
        return out
