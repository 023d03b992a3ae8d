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
