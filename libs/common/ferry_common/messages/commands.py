"""Saga steps and their answers, named after the seed's messages.

Every command carries the ``migration_id`` that makes it idempotent: a host service
answers a replayed command for a step it already did with the same answer.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ..bus.topology import HOST_SERVICES, HostService
from .base import Wire
from .domain import Element, Embot, Event, ManagementGraph, Module, ModuleRef, VmSpec
from .limits import (
    MAX_ELEMENTS,
    MAX_EVENTS,
    MAX_MODULE_ROUNDS,
    MAX_MODULES,
    MAX_RECENT_IDS,
    JsonObject,
    Name,
    Text,
)


class Step(Wire):
    migration_id: Name
    vm_id: Name
    #: a command's host services and the answers it accepts (declared at the end of the module)
    services: ClassVar[tuple[HostService, ...]] = ()
    replies: ClassVar[tuple[type[Wire], ...]] = ()


# --- generic answers ---------------------------------------------------------------
class Done(Wire):
    """A step was carried out (or had already been)."""

    detail: JsonObject = Field(default_factory=dict)


class ErrorReply(Wire):
    """The request could not be handled; says why and whether retrying may help."""

    code: Name
    reason: Text
    retryable: bool = False


# --- admission (target migration-policy) ----------------------------------------
class StartMigration(Step):
    source_host: Name
    target_host: Name
    vm: VmSpec


class MigrationPermitted(Wire):
    reservation_id: Name


class MigrationDenied(Wire):
    code: Name
    reason: Text


class CommitReservation(Step):
    """After completion the reservation becomes the VM's placement."""


# --- freeze events (source sensor) ----------------------------------------------
class FreezeEvents(Step):
    pass


class EventsFrozen(Wire):
    queued: int = 0


# --- management state -----------------------------------------------------------
class ExportManagementState(Step):
    """Source managed-object: serialize the VM element, dependents and embots; track dirt.

    With ``target_host`` the source forwards the graph to that host's managed object as a
    :class:`ManagementState` (with ``modules``), whose answer goes straight to the
    requester: the graph crosses the bus once and is decoded once. Without it the source
    answers :class:`ManagementStateExport`.
    """

    target_host: Name | None = None
    modules: list[Module] = Field(default_factory=list, max_length=MAX_MODULES)


class ManagementStateExport(Wire):
    graph: ManagementGraph


class ManagementState(Step):
    """Target managed-object: stage the graph; ``modules`` answers a ``ModulesRequired``.

    With ``source_host`` a target that lacks modules asks that host's managed object for them
    itself (:class:`FetchModules` with ``target_host``), which sends the graph again with them:
    the requester hears only the end of it. ``module_round`` counts those rounds and
    ``supplied`` names the modules earlier rounds brought."""

    graph: ManagementGraph
    modules: list[Module] = Field(default_factory=list, max_length=MAX_MODULES)
    source_host: Name | None = None
    module_round: int = Field(default=0, ge=0, le=MAX_MODULE_ROUNDS)
    supplied: list[Name] = Field(default_factory=list, max_length=MAX_MODULES)


class ModulesRequired(Wire):
    """The target lacks these modules; the saga fetches them from the source and retries."""

    missing: list[ModuleRef] = Field(max_length=MAX_MODULES)


class FetchModules(Step):
    """Source managed-object: the modules ``refs`` and their dependencies. With ``target_host``
    (the target asking, host to host) the answer is the graph again, forwarded to that host's
    managed object with the modules found, or an instantiation error if some are unknown here too."""

    refs: list[ModuleRef] = Field(max_length=MAX_MODULES)
    target_host: Name | None = None
    module_round: int = Field(default=0, ge=0, le=MAX_MODULE_ROUNDS)
    supplied: list[Name] = Field(default_factory=list, max_length=MAX_MODULES)


class ModulesFetched(Wire):
    modules: list[Module] = Field(max_length=MAX_MODULES)


class ManagementStateSuccess(Wire):
    element_ids: list[Name] = Field(max_length=MAX_ELEMENTS)
    # modules the target took from the source host to host on the way, and in how many rounds
    modules_fetched: list[Name] = Field(default_factory=list, max_length=MAX_MODULES)
    module_rounds: int = Field(default=0, ge=0, le=MAX_MODULE_ROUNDS)


class ManagementStateFailed(Wire):
    reason: Text


class ManagedObjectInstantiationError(Wire):
    reason: Text


# --- management event state -----------------------------------------------------
class StageEvents(Step):
    """Target sensor: start taking the VM's events, staged (queued, not dispatched)."""


class ExportEventState(Step):
    pass


class SendEventState(Step):
    """To the source's sensor: send the queued events to ``target_host``'s sensor as
    a :class:`ManagementEventState`, whose answer goes straight to the requester."""

    target_host: Name
    element_ids: list[Name] = Field(max_length=MAX_ELEMENTS)


class EventStateExport(Wire):
    events: list[Event] = Field(max_length=MAX_EVENTS)


class ManagementEventState(Step):
    events: list[Event] = Field(max_length=MAX_EVENTS)
    element_ids: list[Name] = Field(max_length=MAX_ELEMENTS)


class ManagementEventStateSuccess(Wire):
    staged: int


class ManagementEventStateFailed(Wire):
    reason: Text


# --- migrate the VM (hypervisor adapters) ---------------------------------------
class PrepareIncoming(Step):
    vm: VmSpec
    source_host: Name
    params: JsonObject = Field(default_factory=dict)
    # asked beside admission, before the policy allowed the migration: take a receiving process
    # that already runs (a standby) and start nothing; the answer's uri is empty if none is ready
    ready_only: bool = False


class IncomingPrepared(Wire):
    uri: Text  # empty: asked ready_only and nothing was ready
    # hosts run the same driver kind: False (libvirt peer-to-peer) tells the saga not to start
    # the VM's migration before the plane is staged, since a completed one cannot be undone
    source_resumable: bool = True


class PerformMigration(Step):
    """Source adapter: start the live migration; answers at once, finishes later."""

    uri: Text
    target_host: Name
    params: JsonObject = Field(default_factory=dict)
    notify: Name | None = None  # routing key for VmMigrationFinished


class VmMigrationFinished(Step):
    """Published by the source adapter to the saga's ``notify`` key when the hypervisor is done."""

    outcome: Literal["completed", "failed", "cancelled"]
    reason: Text | None = None
    stats: JsonObject = Field(default_factory=dict)
    # post-copy started: the source no longer holds a runnable guest, whatever the outcome
    postcopy_started: bool = False


class MigrationStarted(Wire):
    """The migration runs (or ran): ``finished`` is set once the hypervisor is done."""

    already: bool = False
    finished: VmMigrationFinished | None = None
    # False when the source hypervisor ends the guest on completion (libvirt p2p): the saga
    # then treats the hypervisor's completion as the switch-over and goes forward only
    source_resumable: bool = True
    # the hypervisor switched to post-copy: the guest runs on the target only, and the
    # migration can no longer be cancelled (the saga goes forward from then on)
    postcopy_started: bool = False


class FinishIncoming(Step):
    """Target adapter: the guest must now run here."""


class AbortIncoming(Step):
    pass


class CancelVmMigration(Step):
    pass


class ConfirmSource(Step):
    """Source adapter: the guest runs on the target; end it here."""


# --- dirty objects (while the VM pre-copies, and a final round) -----------------
class ExportDirtyObjects(Step):
    final: bool = False
    since_export: bool = False  # everything changed since the plane's export, not just since the last round
    # set: the source sends the round straight to the target's managed object as MigrationState
    # (the target answers the requester); unset: the source answers with DirtyObjects
    target_host: Name | None = None


class DirtyObjects(Wire):
    elements: list[Element] = Field(default_factory=list, max_length=MAX_ELEMENTS)
    embots: list[Embot] = Field(default_factory=list, max_length=MAX_ELEMENTS)
    round: int = 0
    # ids of the events the source acted on in the same span: the target's dedup window must
    # know them, or a producer's resend of one would act a second time there
    recent_event_ids: list[Name] = Field(default_factory=list, max_length=MAX_RECENT_IDS)


class MigrationState(Step):
    elements: list[Element] = Field(default_factory=list, max_length=MAX_ELEMENTS)
    embots: list[Embot] = Field(default_factory=list, max_length=MAX_ELEMENTS)
    round: int = 0
    recent_event_ids: list[Name] = Field(default_factory=list, max_length=MAX_RECENT_IDS)


class MigrationStateSuccess(Wire):
    applied: int


# --- complete and tear down -----------------------------------------------------
class MigrationComplete(Step):
    epoch: int = 0
    lease_s: float = 10.0  # the target owns the VM from now, for this long before renewing


class MigrationCompleteAck(Wire):
    dispatched: int = 0


class SourceTeardown(Step):
    pass


# --- compensation (the seed's two clean-up procedures) -----------------------------
class CleanupTarget(Step):
    pass


class CleanupSource(Step):
    pass


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


class Inspect(Wire):
    query = True
    vm_id: Name | None = None
    services: ClassVar[tuple[HostService, ...]] = ()
    replies: ClassVar[tuple[type[Wire], ...]] = ()


#: what the saga sends: its steps' commands, and the query of a VM's state on a host
Command = Step | Inspect


class Inspection(Wire):
    host: Name
    service: Name
    data: dict[str, object] = Field(default_factory=dict)


class ListMigrations(Wire):
    query = True
    vm_id: Name | None = None
    migration_id: Name | None = None  # just this one (if the store has it)
    limit: int = Field(default=50, ge=1, le=1000)


class MigrationList(Wire):
    migrations: list[dict[str, object]]


class ListHosts(Wire):
    """The fleet as the coordinator sees it (``ferry hosts``)."""

    query = True


class HostList(Wire):
    # each host: capacity_mib, used_mib, reserved_mib, inbound, outbound, labels, state, vms
    hosts: list[dict[str, object]]


class GetLimits(Wire):
    """The migration limits in force; with any field set, change them first (``ferry limits``)."""

    query = True
    cluster: int | None = Field(default=None, ge=1, le=10_000)
    outbound_per_host: int | None = Field(default=None, ge=1, le=10_000)
    inbound_per_host: int | None = Field(default=None, ge=1, le=10_000)


class LimitsInfo(Wire):
    limits: dict[str, object]
    in_flight: int = 0
    queued: int = 0


class GetTrace(Wire):
    query = True
    migration_id: Name


class TraceSpans(Wire):
    spans: list[dict[str, object]]


class HealthCheck(Wire):
    pass


class Health(Wire):
    service: Name
    host: Name | None = None
    ok: bool = True
    detail: JsonObject = Field(default_factory=dict)




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


# --- where each saga command goes, and the answers it accepts (an error reply aside) --
def _declare(command: type[Command], services: tuple[HostService, ...], *replies: type[Wire]) -> None:
    command.services, command.replies = services, replies


_GRAPH_ANSWERS = (ManagementStateSuccess, ManagementStateFailed, ManagedObjectInstantiationError, ModulesRequired)
_declare(StartMigration, ("migration_policy",), MigrationPermitted, MigrationDenied)
_declare(CommitReservation, ("migration_policy",), Done)
_declare(FreezeEvents, ("sensor",), EventsFrozen)
_declare(StageEvents, ("sensor",), Done)
_declare(ExportManagementState, ("managed_object",), *_GRAPH_ANSWERS, ManagementStateExport)
_declare(ManagementState, ("managed_object",), *_GRAPH_ANSWERS)
_declare(FetchModules, ("managed_object",), ModulesFetched, *_GRAPH_ANSWERS)
_declare(SendEventState, ("sensor",), ManagementEventStateSuccess, ManagementEventStateFailed, ManagedObjectInstantiationError)
_declare(ManagementEventState, ("sensor",), ManagementEventStateSuccess, ManagementEventStateFailed, ManagedObjectInstantiationError)
_declare(ExportEventState, ("sensor",), EventStateExport)
_declare(ExportDirtyObjects, ("managed_object",), MigrationStateSuccess, ManagementStateFailed, DirtyObjects)
_declare(MigrationState, ("managed_object",), MigrationStateSuccess, ManagementStateFailed)
_declare(PrepareIncoming, ("hypervisor_adapter",), IncomingPrepared)
_declare(PerformMigration, ("hypervisor_adapter",), MigrationStarted)
_declare(FinishIncoming, ("hypervisor_adapter",), Done)
_declare(MigrationComplete, ("managed_object", "sensor"), MigrationCompleteAck)
_declare(SourceTeardown, ("sensor", "managed_object", "hypervisor_adapter"), Done)
_declare(CleanupTarget, HOST_SERVICES, Done)
_declare(CleanupSource, ("hypervisor_adapter", "managed_object", "sensor"), Done)
_declare(Inspect, HOST_SERVICES, Inspection)
