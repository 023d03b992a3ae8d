"""Ownership leases: a sensor dispatches a VM's events only while it holds the VM's lease.

The coordinator keeps who owns each VM (and an epoch that grows at every switch-over)
and grants leases to the owner alone. A source gives its lease up when it freezes the
VM's events (step 2); ownership moves to the target at step 7, which receives its first
lease with ``MigrationComplete``. A host that missed every message after that cannot
dispatch the VM's events again: renewing is refused, and without a lease events are held.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ferry_common.clock import Clock


@dataclass
class LeaseBook:
    clock: Clock
    until: dict[str, float] = field(default_factory=dict)
    ttl_s: float = 10.0

    def valid(self, vm_id: str) -> bool:
        return self.until.get(vm_id, 0.0) > self.clock.monotonic()

    def grant(self, vm_id: str, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.until[vm_id] = self.clock.monotonic() + ttl_s

    def surrender(self, vm_id: str) -> None:
        self.until.pop(vm_id, None)

    def due(self, vm_ids: list[str]) -> list[str]:
        """VMs whose lease is missing or past two thirds of its life."""
        horizon = self.clock.monotonic() + self.ttl_s / 3
        return [v for v in vm_ids if self.until.get(v, 0.0) <= horizon]
