"""Names of exchanges, queues and routing keys: the one place they are spelled."""

from __future__ import annotations

from typing import Literal, get_args

EXCHANGE = "ferry"
DEAD_LETTER_EXCHANGE = "ferry.dlx"
DEAD_LETTER_QUEUE = "ferry.dead-letter"
DELIVERY_LIMIT = 5

MIGRATION_REQUESTED = "migration.requested"
MIGRATION_CANCEL = "migration.cancel"
SAGA_NOTIFY = "saga.notify"
COORDINATOR_QUERY = "coordinator.query"
COORDINATOR_QUEUE = "ferry.coordinator"
TELEMETRY_SPANS = "telemetry.spans"
# host drain and maintenance (ferry_common.messages.drains)
HOST_DRAIN_REQUEST = "host.drain.request"
HOST_DRAIN_CANCEL = "host.drain.cancel"
HOST_UNCORDON = "host.uncordon"

REASON_HEADER = "x-ferry-reason"
CODE_HEADER = "x-ferry-error-code"

#: The services every host runs, each its own process in a deployment (deploy/, docs/operations.md).
HostService = Literal["sensor", "managed_object", "migration_policy", "hypervisor_adapter"]
HOST_SERVICES: tuple[HostService, ...] = get_args(HostService)


def migration_status(status: str) -> str:
    return f"migration.{status}"


def host_command(host: str, service: str) -> str:
    """Routing key of the commands one service on one host takes."""
    return f"host.{host}.{service}"


def host_queue(host: str, service: str) -> str:
    return f"ferry.{host}.{service}"


def drain_status(host: str, status: str) -> str:
    """Where a drain of ``host`` announces its state (draining, drained, failed, cancelled)."""
    return f"host.{host}.drain.{status}"


def inventory(host: str) -> str:
    return f"inventory.{host}"


def vm_events(vm_id: str) -> str:
    """Where producers publish a VM's service-plane events."""
    return f"vm.{vm_id}.event"


def host_load(host: str) -> str:
    """Where a host publishes its load (``HostLoad``)."""
    return f"host.{host}.load"


def host_event(host: str) -> str:
    """Where a host's faults are reported (``HostFaultEvent``), by its agent or an outside one."""
    return f"host.{host}.event"


def recommendation_status(status: str) -> str:
    return f"recommendation.{status}"


#: what policies ask of the coordinator's autonomic balancer; its shared queue (the
#: operators' commands to it come as coordinator queries)
AUTONOMIC_WANTED = "autonomic.wanted"
AUTONOMIC_QUEUE = "coordinator.autonomic"


def reply_to(instance: str) -> str:
    return f"reply.{instance}"


def alarm(vm_id: str) -> str:
    return f"alarm.{vm_id}"


# Binding patterns: one topic wildcard in place of the id, built by the functions above so
# that a key and the pattern that takes it cannot drift apart.
MIGRATION_STATUSES = migration_status("*")
VM_EVENTS = vm_events("*")
HOST_LOADS = host_load("*")
HOST_EVENTS = host_event("*")
INVENTORIES = inventory("*")
ALARMS = alarm("*")
DRAIN_STATUSES = drain_status("*", "*")
