"""Questions to the services and the coordinator (CLI, demo, tests): what a host holds for a
VM, the migrations and their traces, health."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from ...bus.topology import HOST_SERVICES, HostService
from ..base import Wire
from ..limits import (
    JsonObject,
    Name,
)
from .steps import Step


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


Inspect.services, Inspect.replies = HOST_SERVICES, (Inspection,)
