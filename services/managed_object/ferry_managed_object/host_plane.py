"""A host's own management plane: host-level elements and embots, fed by the host's telemetry.

A host's plane is a plane like a VM's, named ``host.<host>`` (its element of that name is the
host; ``ferry plane apply -f examples/host-policies.yaml --on HOST``), kept by the host's
managed object. Its events are the host's load samples (``host.<host>.load``, kind
``host.load``) and faults (``host.<host>.event``, kind ``host.fault``), which this managed
object takes on its own durable queue and dispatches to the plane through the same path as a
VM's events (:meth:`ManagedObjectService.on_dispatch`): the same CEL engine, each event acted
on once (the dedup window), in order, the embots' state stored before the ack, and what the
policies ask for (``migrate`` with key ``request_migration``, ``recommend_migration`` or
``evacuate_host``) sent through the durable outbox.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ferry_common.endpoint import Context
from ferry_common.messages.commands import DispatchEvents
from ferry_common.messages.domain import Event
from ferry_common.messages.host_events import HostFaultEvent, HostLoad

if TYPE_CHECKING:
    from .service import ManagedObjectService


def host_plane_id(host: str) -> str:
    return f"host.{host}"


def load_event(msg: HostLoad) -> Event:
    """A load sample as the event a host policy sees: percentages, and the busiest VM."""
    plane = host_plane_id(msg.host)
    hottest = max(msg.vms, key=lambda g: g.cpu, default=None)
    data = {
        "cpu_pct": round(100.0 * msg.cpu_used / msg.cpus, 3),
        "memory_pct": round(100.0 * msg.memory_used_mib / msg.memory_mib, 3),
        "cpu_used": msg.cpu_used, "cpus": msg.cpus,
        "memory_used_mib": msg.memory_used_mib, "memory_mib": msg.memory_mib,
        "vms": len(msg.vms),
        "hottest_vm": hottest.vm_id if hottest else "",
        "hottest_cpu": hottest.cpu if hottest else 0.0,
    }
    return Event(id=f"load.{msg.host}.{msg.at:.6f}", vm_id=plane, element_id=plane, kind="host.load",
                 ts=msg.at, data=data)


def fault_event(msg: HostFaultEvent) -> Event:
    plane = host_plane_id(msg.host)
    data = {"kind": msg.kind, "severity": msg.severity, "message": msg.message, "detail": dict(msg.detail),
            "source": msg.source or ""}
    return Event(id=f"fault.{msg.id}", vm_id=plane, element_id=plane, kind="host.fault", ts=msg.at, data=data)


class HostFeed:
    """The host's telemetry into its plane (nothing happens while it has none)."""

    def __init__(self, svc: ManagedObjectService) -> None:
        self.svc = svc

    async def on_load(self, msg: HostLoad, ctx: Context) -> None:
        if msg.host == self.svc.host:
            await self._dispatch(load_event(msg), ctx)
        return None

    async def on_fault(self, msg: HostFaultEvent, ctx: Context) -> None:
        if msg.host == self.svc.host:
            await self._dispatch(fault_event(msg), ctx)
        return None

    async def _dispatch(self, event: Event, ctx: Context) -> None:
        plane = self.svc.planes.get(event.vm_id)
        if plane is None or plane.status != "active":
            return
        await self.svc.on_dispatch(DispatchEvents(vm_id=event.vm_id, events=[event]), ctx)
