"""Host drain and maintenance: the public messages.

A client publishes ``DrainRequest`` on ``host.drain.request`` (``ferry host drain``, or a
Kubernetes Job), ``DrainCancel`` on ``host.drain.cancel`` and ``HostUncordon`` on
``host.uncordon``; a drain's progress and outcome come back as ``DrainStatusEvent`` on
``host.<host>.drain.<status>``. See docs/operations.md, "Draining a host".
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Wire
from .limits import Name, Text
from .recommendations import MoveReason

OnUnmovable = Literal["block", "leave"]
DrainPriority = Literal["drain", "evacuation"]
DrainStatus = Literal["draining", "drained", "failed", "cancelled"]
MAX_DRAIN_VMS = 10_000


class DrainRequest(Wire):
    """Empty ``host``: cordon it and migrate every VM on it away, at drain priority (or, for a
    failing host, evacuation priority). A drain already running on ``host`` is the answer."""

    host: Name
    drain_id: Name | None = Field(default=None, description="Chosen by the client to make the request idempotent.")
    dry_run: bool = Field(default=False, description="Answer the plan (DrainPlan) and change nothing.")
    deadline_s: float | None = Field(
        default=None, gt=0, description="Seconds from now after which what has not left ends the drain `failed`."
    )
    on_unmovable: OnUnmovable = Field(
        default="block",
        description="A VM no host fits or pinned by policy: `block` ends the drain `failed` naming it;\n"
        "`leave` ends it `drained` with the VM listed and left where it is.\n",
    )
    max_attempts: int = Field(default=3, ge=1, le=10, description="Migrations tried per VM (each on another host).")
    reason: Text | None = None
    priority: DrainPriority = Field(
        default="drain", description="The queue priority of its migrations: `evacuation` goes before every other."
    )
    why: MoveReason | None = Field(
        default=None, description="Why the host is emptied (a fault, a policy): kept on the drain and each migration."
    )
    leave: dict[Name, Text] = Field(
        default_factory=dict, max_length=MAX_DRAIN_VMS,
        description="VMs not to move, with why: listed as unmovable, never a reason to fail the drain.",
    )


class DrainCancel(Wire):
    """Stop draining ``host``: queued migrations never start; ``abort`` also rolls back those in flight."""

    host: Name
    abort: bool = False


class HostUncordon(Wire):
    """Let placement choose ``host`` again; ``return_vms`` also moves back the VMs its last drain moved away."""

    host: Name
    return_vms: bool = False


class GetDrain(Wire):
    """The latest drain of ``host`` (answered with a DrainStatusEvent)."""

    query = True
    host: Name


class DrainVmPlan(Wire):
    vm_id: Name
    target: Name | None = Field(default=None, description="None when it cannot move (see reason).")
    order: int = 0
    estimate_s: float = Field(default=0.0, description="Seconds from the drain's start until it has left.")
    reason: Text | None = None


class DrainPlan(Wire):
    """What a drain of ``host`` would do (``--dry-run``): nothing was changed."""

    host: Name
    vms: list[DrainVmPlan] = Field(default_factory=list, max_length=MAX_DRAIN_VMS)
    unmovable: list[DrainVmPlan] = Field(default_factory=list, max_length=MAX_DRAIN_VMS)
    estimate_s: float = 0.0
    parallel: int = 1


class DrainStatusEvent(Wire):
    """A drain's state and progress (also the answer to DrainRequest, DrainCancel and GetDrain)."""

    drain_id: Name
    host: Name
    status: DrainStatus
    total: int = 0
    done: int = 0
    failed: int = 0
    in_flight: int = 0
    queued: int = 0
    unmovable: int = 0
    eta_s: float | None = Field(default=None, description="Estimated seconds left, from measured migration times.")
    failed_vms: list[Name] = Field(default_factory=list, max_length=MAX_DRAIN_VMS)
    unmovable_vms: dict[Name, Text] = Field(default_factory=dict, description="VM -> why it cannot move.")
    remaining_vms: list[Name] = Field(default_factory=list, max_length=MAX_DRAIN_VMS)
    reason: Text | None = None
    priority: DrainPriority = "drain"
    why: MoveReason | None = None
    at: float = 0.0
