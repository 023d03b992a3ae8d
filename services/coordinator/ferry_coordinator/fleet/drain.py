"""A host drain as a durable object: its state machine, its VMs and its progress.

The drain is kept in the saga store (``store.drains``) and advanced by whichever coordinator
replica gets there first (``fleet.drain_manager``): every change is a versioned save, and the
migrations it asks for have ids derived from the drain, the VM and the attempt, so planning
again after a crash asks for the same migrations (the queue takes an id once).

States: ``draining`` → ``drained`` | ``failed`` | ``cancelled``; nothing leaves an end state.
The host stays cordoned after every end until ``ferry host uncordon``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

from .queue import Priority


class DrainState(StrEnum):
    DRAINING = "draining"
    DRAINED = "drained"
    FAILED = "failed"
    CANCELLED = "cancelled"


TRANSITIONS: Mapping[DrainState, frozenset[DrainState]] = {
    DrainState.DRAINING: frozenset({DrainState.DRAINED, DrainState.FAILED, DrainState.CANCELLED}),
    DrainState.DRAINED: frozenset(),
    DrainState.FAILED: frozenset(),
    DrainState.CANCELLED: frozenset(),
}


class VmState(StrEnum):
    PENDING = "pending"  # its next attempt is to be queued
    QUEUED = "queued"  # in the fleet queue under ``migration_id``
    IN_FLIGHT = "in_flight"  # its saga runs
    DONE = "done"  # it left
    FAILED = "failed"  # every attempt rolled back
    UNMOVABLE = "unmovable"  # no host fits, or pinned by policy
    CANCELLED = "cancelled"  # the drain was cancelled before it left


VM_ENDS = frozenset({VmState.DONE, VmState.FAILED, VmState.UNMOVABLE, VmState.CANCELLED})


class InvalidTransition(ValueError):
    pass


def migration_id(drain_id: str, vm_id: str, attempt: int) -> str:
    """The id of ``vm_id``'s ``attempt``-th migration (from 1) in drain ``drain_id``:
    deterministic, so a replica planning again asks for the same migration."""
    return f"drain.{drain_id}.{vm_id}.{attempt}"


@dataclass
class DrainVm:
    vm_id: str
    memory_mib: int = 0
    state: VmState = VmState.PENDING
    attempt: int = 0  # migrations asked for so far
    migration_id: str | None = None
    tried: list[str] = field(default_factory=list)  # targets whose migration rolled back
    target: str | None = None
    reason: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    why: dict[str, Any] | None = None  # its own MoveReason, else the drain's

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> DrainVm:
        return cls(**{**raw, "state": VmState(raw.get("state", "pending")), "tried": list(raw.get("tried") or [])})


@dataclass
class Drain:
    drain_id: str
    host: str
    state: DrainState = DrainState.DRAINING
    created_at: float = 0.0
    updated_at: float = 0.0
    ended_at: float | None = None
    deadline_at: float | None = None
    on_unmovable: str = "block"
    max_attempts: int = 3
    cordoned: bool = True  # the host; cleared by uncordon
    reason: str | None = None  # why it ended as it did
    requested_by: str | None = None
    vms: dict[str, DrainVm] = field(default_factory=dict)  # in drain order
    durations: list[float] = field(default_factory=list)  # seconds of each completed migration
    trace_links: list[str] = field(default_factory=list)  # the migrations' trace ids
    returned: bool = False  # undrain --return asked for
    priority: int = int(Priority.DRAIN)  # its migrations' (EVACUATION for a failing host)
    why: dict[str, Any] | None = None  # a MoveReason: the fault or policy that asked for it
    left: list[str] = field(default_factory=list)  # VMs asked to stay: unmovable, yet never failing it
    version: int = 0

    @property
    def active(self) -> bool:
        return self.state is DrainState.DRAINING

    @property
    def open(self) -> bool:
        """Still work for the manager: draining, or ended with migrations still running."""
        return self.active or not self.finished_vms()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["state"] = self.state.value
        out["vms"] = {k: {**asdict(v), "state": v.state.value} for k, v in self.vms.items()}
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Drain:
        vms = {k: DrainVm.from_dict(v) for k, v in (raw.get("vms") or {}).items()}
        fields = {k: v for k, v in raw.items() if k not in ("vms", "state")}
        return cls(**fields, state=DrainState(raw.get("state", "draining")), vms=vms)

    def copy(self) -> Drain:
        return Drain.from_dict(self.to_dict())

    def to(self, state: DrainState, *, now: float, reason: str | None = None) -> Drain:
        """This drain in ``state`` (checked against the state machine)."""
        if state is self.state:
            return self
        if state not in TRANSITIONS[self.state]:
            raise InvalidTransition(f"drain {self.drain_id} is {self.state.value}; it cannot become {state.value}")
        return replace(self, state=state, ended_at=now, updated_at=now, reason=reason or self.reason)

    # ---- progress ------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """By state, as ``fleet.metrics.observe_drain`` and the status events count."""
        n = {s: 0 for s in VmState}
        for v in self.vms.values():
            n[v.state] += 1
        return {
            "total": len(self.vms),
            "done": n[VmState.DONE],
            "failed": n[VmState.FAILED],
            "in_flight": n[VmState.IN_FLIGHT],
            "queued": n[VmState.QUEUED] + n[VmState.PENDING],
            "unmovable": n[VmState.UNMOVABLE],
            "cancelled": n[VmState.CANCELLED],
        }

    def eta_s(self, parallel: int) -> float | None:
        """Seconds left: the VMs still to leave, ``parallel`` at a time, at the measured mean
        migration time (None before the first one is measured)."""
        if not self.durations:
            return None
        left = sum(1 for v in self.vms.values() if v.state not in VM_ENDS)
        return math.ceil(left / max(1, parallel)) * (sum(self.durations) / len(self.durations))

    def finished_vms(self) -> bool:
        return all(v.state in VM_ENDS for v in self.vms.values())

    def outcome(self) -> tuple[DrainState, str | None]:
        """How it ends once every VM has: failed if any VM failed, or is unmovable (and not
        asked to stay) under ``block``; else drained."""
        failed = sorted(v.vm_id for v in self.vms.values() if v.state is VmState.FAILED)
        stuck = sorted(v.vm_id for v in self.vms.values() if v.state is VmState.UNMOVABLE and v.vm_id not in self.left)
        parts = []
        if failed:
            parts.append(f"failed to move: {', '.join(failed)}")
        if stuck:
            parts.append(f"cannot move: {', '.join(stuck)}")
        if failed or (stuck and self.on_unmovable == "block"):
            return DrainState.FAILED, "; ".join(parts)
        if self.left:
            parts.append(f"left as asked: {', '.join(sorted(self.left))}")
        return DrainState.DRAINED, "; ".join(parts) or None

    def moved(self) -> dict[str, str]:
        """VM → the host it left for (what ``undrain --return`` brings back)."""
        return {v.vm_id: v.target for v in self.vms.values() if v.state is VmState.DONE and v.target}
