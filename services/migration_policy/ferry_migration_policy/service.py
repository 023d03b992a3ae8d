"""Admission control on the target (step 1) and the reservations it holds.

"Is migration from this source allowed" is an allow-list of host patterns;
"are resources sufficient" compares the VM's memory with the host's capacity less
what its VMs use (from the adapter's inventory) and what is reserved. For a guest adopted
from a host's hypervisor, "can it run here" is asked of this host's adapter (CheckIncoming:
host devices, disks by storage mode, the CPU model), and its refusals deny the migration.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from ferry_common.bus.topology import host_command, inventory
from ferry_common.endpoint import Context, Endpoint
from ferry_common.messages.base import Wire
from ferry_common.messages.commands import (
    CheckIncoming,
    CleanupTarget,
    CommitReservation,
    Done,
    IncomingCheck,
    Inspect,
    Inspection,
    MigrationDenied,
    MigrationPermitted,
    StartMigration,
)
from ferry_common.messages.public import HostInventory
from ferry_common.service import HostService
from ferry_common.state import StateStore


@dataclass
class Reservation:
    migration_id: str
    vm_id: str
    memory_mib: int
    source_host: str


class MigrationPolicyService(HostService):
    service = "migration_policy"

    def __init__(
        self,
        host: str,
        endpoint: Endpoint,
        state: StateStore | None = None,
        *,
        allowed_sources: tuple[str, ...] = ("*",),
        capacity_mib: int | None = None,
        check_timeout_s: float = 20.0,
    ) -> None:
        super().__init__(host, endpoint, state)
        self.allowed_sources = allowed_sources
        self.capacity_mib = capacity_mib
        self.check_timeout_s = check_timeout_s  # the adapter asks its hypervisor (storage, CPU)
        self.reservations: dict[str, Reservation] = {}
        self.inventory: HostInventory | None = None
        r = self.router
        r.route_key(inventory(host), HostInventory)
        r.add(HostInventory, self.on_inventory)
        r.add(Inspect, self.on_inspect)
        self.step(StartMigration, self.on_start)
        self.step(CommitReservation, self.on_commit)
        self.step(CleanupTarget, self.on_cleanup)

    def bindings(self) -> tuple[str, ...]:
        return (host_command(self.host, self.service), inventory(self.host))

    async def restore(self) -> None:
        for mid, raw in await self.state.items("reservations"):
            self.reservations[mid] = Reservation(**raw)

    async def on_inventory(self, msg: HostInventory, ctx: Context) -> None:
        if msg.host == self.host and not msg.heartbeat:
            self.inventory = msg
        return None

    def free_mib(self) -> int | None:
        capacity = self.capacity_mib
        used = 0
        if self.inventory is not None:
            capacity = capacity if capacity is not None else self.inventory.capacity_mib
            used = sum(v.memory_mib for v in self.inventory.vms)
        if capacity is None:
            return None
        return capacity - used - sum(r.memory_mib for r in self.reservations.values())

    async def on_start(self, msg: StartMigration, ctx: Context) -> Wire:
        if (held := self.reservations.get(msg.migration_id)) is not None and held.vm_id == msg.vm_id:
            # stored before a crash took the answer: the same answer, not a second reservation
            return MigrationPermitted(reservation_id=msg.migration_id)
        if msg.target_host != self.host:
            return MigrationDenied(code="wrong_host", reason=f"this is {self.host}, not {msg.target_host}")
        if not any(fnmatch.fnmatchcase(msg.source_host, p) for p in self.allowed_sources):
            return MigrationDenied(
                code="source_not_allowed", reason=f"migration from {msg.source_host} is not allowed on {self.host}"
            )
        free = self.free_mib()
        if free is not None and msg.vm.memory_mib > free:
            return MigrationDenied(
                code="insufficient_resources",
                reason=f"{msg.vm.memory_mib} MiB needed, {max(free, 0)} MiB free on {self.host}",
            )
        if (refused := await self._refusals(msg)) is not None:
            return refused
        self.reservations[msg.migration_id] = r = Reservation(msg.migration_id, msg.vm_id, msg.vm.memory_mib, msg.source_host)
        await self.state.put("reservations", r.migration_id, vars(r))
        return MigrationPermitted(reservation_id=msg.migration_id)

    async def _refusals(self, msg: StartMigration) -> MigrationDenied | None:
        """An adopted guest brings disks, host devices and a CPU of its own: this host's
        adapter says whether its hypervisor can take them (the first refusal's code, every reason)."""
        if not msg.vm.params.get("adopted"):
            return None
        ans = await self.endpoint.request(host_command(self.host, "hypervisor_adapter"), CheckIncoming(vm=msg.vm),
                                          timeout=self.check_timeout_s)
        if not isinstance(ans, IncomingCheck) or not ans.refusals:
            return None
        return MigrationDenied(code=ans.refusals[0].code, reason="; ".join(r.reason for r in ans.refusals))

    async def on_commit(self, msg: CommitReservation, ctx: Context) -> Done:
        # the VM now shows in the inventory; the reservation has done its job
        self.reservations.pop(msg.migration_id, None)
        await self.state.delete("reservations", msg.migration_id)
        return Done()

    async def on_cleanup(self, msg: CleanupTarget, ctx: Context) -> Done:
        released = self.reservations.pop(msg.migration_id, None)
        await self.state.delete("reservations", msg.migration_id)
        return Done(detail={"released": released is not None})

    async def on_inspect(self, msg: Inspect, ctx: Context) -> Inspection:
        return Inspection(host=self.host, service=self.service, data=self.inspect(msg.vm_id))

    def inspect(self, vm_id: str | None) -> dict[str, Any]:
        return {
            "reservations": {
                k: vars(v) for k, v in self.reservations.items() if vm_id is None or v.vm_id == vm_id
            },
            "free_mib": self.free_mib(),
            "allowed_sources": list(self.allowed_sources),
        }
