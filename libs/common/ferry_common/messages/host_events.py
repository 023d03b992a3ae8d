"""Host health: a fault a host (or an outside agent) reports on ``host.<host>.event``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Wire
from .limits import JsonObject, Name, Text

HostFaultKind = Literal["disk", "memory", "nic", "cpu", "power", "thermal", "other"]
#: ``critical`` means the host should be evacuated now; ``warning`` that it is degrading.
Severity = Literal["info", "warning", "critical"]


class HostFaultEvent(Wire):
    """A fault on ``host``: what failed, how badly, and when it was seen."""

    id: Name
    host: Name
    kind: HostFaultKind
    severity: Severity
    at: float = Field(default=0.0, ge=0)
    source: Name | None = None  # who reported it (the host's own agent, a monitoring system)
    message: Text = ""
    detail: JsonObject = Field(default_factory=dict)


class GuestLoad(Wire):
    """One VM's use of its host, averaged over the last sampling period."""

    vm_id: Name
    cpu: float = Field(ge=0, le=4096)  # cores in use
    memory_used_mib: float = Field(ge=0, le=64 * 1024 * 1024)
    memory_mib: int = Field(ge=1, le=4 * 1024 * 1024)  # allocated
    vcpus: int = Field(default=1, ge=1, le=1024)


class HostLoad(Wire):
    """A host's load, on ``host.<host>.load`` every sampling period: the host's CPU and memory
    (capacity and use) and each VM's share. The balancer's snapshot is built from these."""

    host: Name
    at: float = Field(default=0.0, ge=0)
    cpus: int = Field(ge=1, le=65536)
    memory_mib: int = Field(ge=1, le=1 << 40)
    cpu_used: float = Field(ge=0, le=65536)  # cores busy, host-wide (guests and the rest)
    memory_used_mib: float = Field(ge=0, le=1 << 40)
    vms: list[GuestLoad] = Field(default_factory=list, max_length=10_000)
    period_s: float | None = Field(default=None, gt=0, le=3600)
