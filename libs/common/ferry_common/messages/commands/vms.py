"""A VM's place under management: created or adopted, its plane registered, its events
dispatched, its ownership leased, given back; and whether a guest can come to a host."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..base import Wire
from ..domain import Event, ManagementGraph, Module, VmSpec
from ..limits import (
    MAX_EVENTS,
    MAX_MODULES,
    JsonObject,
    Name,
    Text,
)


# --- ownership leases (fencing) -----------------------------------------------------
class LeaseRequest(Wire):
    """A host's sensor asks to keep dispatching these VMs' events."""

    host: Name
    vms: list[Name] = Field(max_length=10_000)


class LeaseGrant(Wire):
    """Which VMs the host owns for ``ttl_s`` more seconds, and which moved (to whom)."""

    ttl_s: float
    granted: list[Name] = Field(default_factory=list, max_length=10_000)
    moved: dict[Name, Name] = Field(default_factory=dict)


# --- administration and inspection (CLI, demo, tests) ------------------------------
class CreateVm(Wire):
    vm: VmSpec


class DestroyVm(Wire):
    vm_id: Name


class RegisterManagementGraph(Wire):
    graph: ManagementGraph
    modules: list[Module] = Field(default_factory=list, max_length=MAX_MODULES)


class ActivateVmEvents(Wire):
    vm_id: Name


class InstallModules(Wire):
    modules: list[Module] = Field(max_length=MAX_MODULES)


class SetAttributes(Wire):
    vm_id: Name
    element_id: Name
    attributes: JsonObject


class DispatchEvents(Wire):
    """Sensor to managed-object: events in time order, for an active VM.

    ``completed_by`` and ``epoch``: the migration that made the sensor's host the VM's owner,
    and the ownership epoch it gave (none for a VM that never moved). The completion tells the
    managed object and the sensor at once, so a dispatch can arrive before the managed
    object's own ``MigrationComplete``: a plane still staged for that migration takes the
    dispatch as the completion it is.
    """

    vm_id: Name
    events: list[Event] = Field(max_length=MAX_EVENTS)
    completed_by: Name | None = None
    epoch: int = Field(default=0, ge=0)


# --- adopting guests a host already runs (libvirt) -----------------------------------
StorageMode = Literal["shared", "copy"]


class AdoptVm(Wire):
    """Hypervisor adapter: take a defined domain (by name or UUID) under management, its disks
    migrated by ``storage`` (docs/operations.md, "Storage modes"). Answered with :class:`VmAdopted`."""

    domain: Name
    storage: StorageMode = "shared"


class VmAdopted(Wire):
    vm: VmSpec
    already: bool = False


class ReleaseVm(Wire):
    """Give a VM back: each host service stops managing it; the guest runs on, still defined."""

    vm_id: Name


# the codes of IncomingCheck's refusals: admission denies with them, before anything starts
INCOMING_REFUSALS = ("host_device", "cpu_unsupported", "disk_missing", "disk_not_shared", "disk_cache_unsafe",
                     "disk_exists", "disk_unsupported")


class Refusal(Wire):
    """Why a guest cannot come to this host: ``code`` names the reason for machines."""

    code: Name
    reason: Text


class CheckIncoming(Wire):
    """Target adapter, asked by its migration policy at admission: can ``vm`` run here?"""

    vm: VmSpec


class IncomingCheck(Wire):
    refusals: list[Refusal] = Field(default_factory=list, max_length=64)
