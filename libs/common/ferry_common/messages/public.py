"""The public contract: what clients publish and what they can follow.

Clients publish ``MigrateRequest`` on ``migration.requested`` and ``MigrationCancel`` on
``migration.cancel``; outcomes come back as ``MigrationStatusEvent`` on ``migration.<status>``.
Service-plane events go to ``vm.<vm_id>.event``. See ``docs/asyncapi.yaml``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, WithJsonSchema, model_validator

from .base import Wire
from .domain import Event, VmSpec
from .limits import JsonObject, Name, Text
from .recommendations import MoveReason

Status = Literal[
    "queued",
    "accepted",
    "progress",
    "completed",
    "rejected",
    "failed",
    "rolled_back",
]

#: The saga's steps as ``MigrationStatusEvent.step`` names them, in the order they run
#: (docs/protocol.md); ``request`` before the saga starts, ``compensate`` while it rolls back.
STEPS = (
    "request", "admission", "management_state", "migrate_vm", "freeze_events", "event_state",
    "switch_over", "complete", "teardown", "compensate",
)
# documented as an enumeration; validated as any name, so a client keeps reading the statuses
# of a coordinator that names one more step
StepName = Annotated[Name, WithJsonSchema({"type": "string", "enum": list(STEPS)})]
CODES = """\
Queued (held by a limit, see docs/operations.md): cluster_limit,
source_outbound, target_inbound, no_capacity, policy_blocked,
automatic_limit, awaiting_inventory (its VM or target not known yet,
right after a coordinator start or a broker outage). Rejections: unknown_vm, unknown_host, same_host,
no_placement (no host fits; the reason names each host's), cancelled
(cancelled while queued), already_migrating (with
running_migration_id), source_not_allowed, insufficient_resources,
invalid_request; for an adopted guest host_device, cpu_unsupported,
disk_missing, disk_not_shared, disk_cache_unsafe, disk_exists,
disk_unsupported. Roll-backs: timeout, cancelled, management_state_failed,
instantiation_error, event_state_failed, migration_state_failed,
incoming_failed, vm_migration_failed, not_running, unreachable.
"""


# How a migration ends: completed, rolled_back or rejected, or failed with one of
# FORWARD_FAILURES (post-copy had started, so nothing could be rolled back). Any other
# `failed` status announces a rollback that follows.
OUTCOMES = ("completed", "rolled_back", "rejected", "failed")
FORWARD_FAILURES = ("postcopy_failed",)


def is_outcome(status: str, code: str | None) -> bool:
    """Whether a status event with ``status`` and ``code`` ends its migration."""
    return status in ("completed", "rolled_back", "rejected") or (status == "failed" and code in FORWARD_FAILURES)


class MigrateRequest(Wire):
    """Ask for a VM to move, with its management plane, to ``target_host`` (or, without
    one, to the host placement picks). Queued while a limit holds it (``migration.queued``)."""

    vm_id: Name
    target_host: Name | None = Field(default=None, description="Where to; placement picks one if absent.")
    migration_id: Name | None = Field(
        default=None, description="Chosen by the client to make the request idempotent; generated if absent."
    )
    reason: Text | None = None
    params: JsonObject = Field(
        default_factory=dict,
        description="Migration parameters for this migration, over the VM's migration policy\n"
        "(docs/hypervisors.md): downtime_limit_ms, bandwidth_mibps, auto_converge,\n"
        "completion_timeout_per_gib_s, completion_timeout_min_s, stall_timeout_s.\n",
    )
    why: MoveReason | None = Field(
        default=None, description="For an automatic migration: the policy, figures and automation level that started it\n"
        "(kept on the migration's record and in its trace).\n",
    )


class MigrationCancel(Wire):
    """Ask for a migration to stop: a queued one never starts (``rejected``, code ``cancelled``),
    a running one rolls back (honoured until the VM switches over)."""

    migration_id: Name
    reason: Text = "cancelled by operator"


class MigrationStatusEvent(Wire):
    """Progress and outcome of one migration."""

    migration_id: Name
    vm_id: Name
    status: Status
    step: StepName | None = Field(default=None, description="The saga step, listed in the order they run (docs/protocol.md).")
    source_host: Name | None = None
    target_host: Name | None = None
    reason: Text | None = Field(default=None, description="What went wrong, for people.")
    code: Name | None = Field(default=None, description=CODES)
    running_migration_id: Name | None = None
    detail: JsonObject = Field(default_factory=dict)
    at: float = Field(default=0.0, description="Seconds since the epoch.")


class AdoptableVm(Wire):
    """A guest the host's hypervisor has defined and Ferry does not manage yet."""

    name: Name
    uuid: Name
    state: Name  # running, paused, shutoff
    memory_mib: int = Field(ge=0)
    vcpus: int = Field(ge=0)


class HostInventory(Wire):
    """What a host runs and can take; published by each hypervisor adapter."""

    host: Name
    vms: list[VmSpec] = Field(default_factory=list, max_length=10_000)
    capacity_mib: int = Field(ge=0)
    driver: Name = "sim"
    # VM shapes ("MEMORY_MIB:VCPUS") with a receiving process already running here: a saga
    # takes one beside its admission instead of after it
    ready_incoming: list[Name] = Field(default_factory=list, max_length=64)
    # defined guests of the hypervisor that Ferry does not manage (``ferry vm adopt`` takes one)
    adoptable: list[AdoptableVm] = Field(default_factory=list, max_length=10_000)
    # placement's host selectors match these (FERRY_HOST_LABELS="zone=a,disk=ssd")
    labels: dict[Name, Name] = Field(default_factory=dict, max_length=64)
    # the inventory doubles as the host's heartbeat: how often it is sent, so the coordinator
    # knows when one is missed (None: an adapter that does not say)
    period_s: float | None = Field(default=None, gt=0, le=3600)
    # a heartbeat alone: the adapter lives but its hypervisor is slow to answer (a migration
    # holds it), so the lists above are empty and say nothing; only liveness reads it
    heartbeat: bool = Field(default=False, description="a heartbeat alone: the VM lists are not a new inventory")


def incoming_shape(memory_mib: int, vcpus: int) -> str:
    """A VM shape as ``HostInventory.ready_incoming`` names it."""
    return f"{memory_mib}:{vcpus}"


class VmEvent(Event):
    """A service-plane event as a producer publishes it on ``vm.<vm_id>.event``."""


MAX_BATCH = 1000


class VmEventBatch(Wire):
    """Several events of one VM in one message, on ``vm.<vm_id>.event`` with AMQP type
    ``VmEventBatch``: a collector that gathers events costs the broker one message per batch.

    The sensor takes a batch as it takes its events one by one, in list order: each is
    acted on once (by id), in time order; the batch is acknowledged once all of it is
    dispatched or durably queued.
    """

    vm_id: Name
    events: list[Event] = Field(min_length=1, max_length=MAX_BATCH)

    @model_validator(mode="after")
    def _one_vm(self) -> VmEventBatch:
        for e in self.events:
            if e.vm_id != self.vm_id:
                raise ValueError(f"event {e.id!r} is for vm {e.vm_id!r}, not {self.vm_id!r}")
        return self


class Alarm(Wire):
    """Raised by a policy; published on ``alarm.<vm_id>``."""

    vm_id: Name
    element_id: Name
    embot_id: Name
    policy: Name
    host: Name
    name: Name
    detail: JsonObject = Field(default_factory=dict)
