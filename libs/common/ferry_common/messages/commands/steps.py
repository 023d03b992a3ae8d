"""Saga steps and their answers, named after the seed's messages, and where each goes.

Every command carries the ``migration_id`` that makes it idempotent: a host service
answers a replayed command for a step it already did with the same answer.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ...bus.topology import HOST_SERVICES, HostService
from ..base import Wire
from ..domain import Element, Embot, Event, ManagementGraph, Module, ModuleRef, VmSpec
from ..limits import (
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


# --- where each saga command goes, and the answers it accepts (an error reply aside) --
def _declare(command: type[Step], services: tuple[HostService, ...], *replies: type[Wire]) -> None:
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
