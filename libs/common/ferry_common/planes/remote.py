"""The ``ferry plane`` commands over the bus: find the host where the VM runs, and apply a
document to (or read one from) that host's managed object."""

from __future__ import annotations

from ..bus.topology import COORDINATOR_QUERY, host_command
from ..endpoint import Endpoint
from ..errors import FerryError
from ..messages.commands import ActivateVmEvents, Inspect, Inspection
from ..messages.plane import PlaneDocument
from ..messages.planes import ApplyPlane, GetPlane, PlaneApplied, PlaneFound


class NoHost(FerryError):
    code = "vm_not_placed"


async def host_of(endpoint: Endpoint, vm_id: str, *, timeout: float = 10.0) -> str:
    """The host the coordinator last saw running ``vm_id``."""
    ans = await endpoint.request(COORDINATOR_QUERY, Inspect(), timeout=timeout)
    assert isinstance(ans, Inspection)
    placement = ans.data.get("placement", {})
    assert isinstance(placement, dict)
    hosts = sorted(str(h) for h, vms in placement.items() if vm_id in vms)
    if not hosts:
        raise NoHost(f"vm {vm_id!r} runs on no host the coordinator knows: name its host with --on")
    return hosts[0]


async def apply_plane(endpoint: Endpoint, host: str, doc: PlaneDocument, *, timeout: float = 10.0) -> PlaneApplied:
    """Apply ``doc`` on ``host``; a plane created there then takes the VM's events (as a plane
    registered with the VM does), which the sensor does not before the plane exists."""
    ans = await endpoint.request(host_command(host, "managed_object"), ApplyPlane(plane=doc), timeout=timeout)
    assert isinstance(ans, PlaneApplied)
    if ans.result == "created":
        await endpoint.request(host_command(host, "sensor"), ActivateVmEvents(vm_id=doc.vm), timeout=timeout)
    return ans


async def get_plane(endpoint: Endpoint, host: str, vm_id: str, *, timeout: float = 10.0) -> PlaneDocument:
    ans = await endpoint.request(host_command(host, "managed_object"), GetPlane(vm_id=vm_id), timeout=timeout)
    assert isinstance(ans, PlaneFound)
    return ans.plane
