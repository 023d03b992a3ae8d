"""The fleet queue's vocabulary: priorities, reasons, limits and one queued migration.

A migration beyond a limit is not refused but queued with a reason that says what holds it.
The queue and the slots it hands out live in the durable saga store
(:class:`~ferry_coordinator.store.base.FleetQueue`); the order in which entries start is
:func:`~ferry_coordinator.fleet.scheduling.plan`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import IntEnum, StrEnum
from typing import Any

from pydantic import TypeAdapter


class Priority(IntEnum):
    """Why a VM moves, highest first. Gaps leave room for levels between these."""

    REBALANCE = 100  # automatic balancing (issue 16): yields to everything else
    OPERATOR = 200
    DRAIN = 300
    EVACUATION = 400  # a failing host

    @classmethod
    def parse(cls, name: str) -> Priority:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown priority {name!r} (one of {', '.join(p.name.lower() for p in cls)})") from None


class Reason(StrEnum):
    """What keeps a queued migration from starting (``migration.queued``'s ``code``)."""

    CLUSTER_LIMIT = "cluster_limit"
    SOURCE_OUTBOUND = "source_outbound"
    TARGET_INBOUND = "target_inbound"
    NO_CAPACITY = "no_capacity"
    POLICY_BLOCKED = "policy_blocked"
    AUTOMATIC_LIMIT = "automatic_limit"  # automatic (rebalancing) migrations already in flight
    # its VM (or target) is on no host the coordinator knows yet, whose inventories are not all
    # in (fleet/settled.py): it starts once they show it, or is rejected
    AWAITING_INVENTORY = "awaiting_inventory"


class EntryState(StrEnum):
    QUEUED = "queued"
    STARTED = "started"  # holds a slot until its saga ends
    DONE = "done"  # slot released
    CANCELLED = "cancelled"  # never started, never will


LIVE_STATES = frozenset({EntryState.QUEUED, EntryState.STARTED})


@dataclass(frozen=True)
class Limits:
    """Migrations in flight: cluster-wide, outbound per source host, inbound per target host.

    The defaults follow the anchors: KubeVirt's parallelMigrationsPerCluster (5) and
    parallelOutboundMigrationsPerNode (2), oVirt's per-host inbound/outbound (2). ``automatic``
    bounds the migrations of priority REBALANCE in flight (Proxmox and issue 16: one at a time),
    so a balancer never storms. A queued entry gains one priority level per ``ageing_s``
    waited, so nothing waits forever.
    """

    cluster: int = 5
    outbound_per_host: int = 2
    inbound_per_host: int = 2
    ageing_s: float = 600.0
    automatic: int = 1

    def __post_init__(self) -> None:
        for name in ("cluster", "outbound_per_host", "inbound_per_host", "automatic"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"limit {name} must be at least 1, not {getattr(self, name)!r}")
        if not self.ageing_s > 0:
            raise ValueError(f"ageing_s must be positive, not {self.ageing_s!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Limits:
        return cls(
            cluster=int(raw["cluster"]),
            outbound_per_host=int(raw["outbound_per_host"]),
            inbound_per_host=int(raw["inbound_per_host"]),
            ageing_s=float(raw["ageing_s"]),
            automatic=int(raw.get("automatic", cls.automatic)),
        )


@dataclass(frozen=True)
class QueueEntry:
    """One migration asked for, queued until a slot is free, then holding that slot.

    ``candidates`` are the targets placement ranked, best first (one for an explicit
    ``--to``); the claim takes the first whose inbound limit has room and records it as
    ``target_host``. ``group`` is the fair-share key within a priority (a drain's id, or the
    source host). ``request`` keeps what the coordinator needs to start the saga.
    """

    migration_id: str
    vm_id: str
    source_host: str
    candidates: tuple[str, ...]
    priority: Priority
    group: str
    enqueued_at: float
    state: EntryState = EntryState.QUEUED
    target_host: str | None = None
    policy_block: str | None = None  # why policy holds it, or None
    # with no candidates: placement's reason per host ("host-b: insufficient memory; ...")
    placement_note: str | None = None
    owner: str | None = None  # the replica that claimed it
    started_at: float | None = None
    ended_at: float | None = None
    request: dict[str, Any] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    @property
    def awaiting_inventory(self) -> bool:
        """Queued before any inventory showed its VM: no source yet (``Reason.AWAITING_INVENTORY``)."""
        return not self.source_host

    def to_dict(self) -> dict[str, Any]:
        """The entry as JSON values (the SQL stores keep it as a row's body)."""
        return {
            **asdict(self),
            "candidates": list(self.candidates),
            "priority": int(self.priority),
            "state": self.state.value,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> QueueEntry:
        """An entry from :meth:`to_dict`'s form, checked and coerced field by field."""
        body = {**raw, "candidates": raw.get("candidates") or (), "request": raw.get("request") or {}}
        return _ENTRY.validate_python(body)

    def started(self, target: str, owner: str, now: float) -> QueueEntry:
        return replace(self, state=EntryState.STARTED, target_host=target, owner=owner, started_at=now)

    def updated(
        self,
        candidates: Sequence[str] | None,
        policy_block: str | None,
        clear_policy_block: bool,
        placement_note: str | None = None,
    ) -> QueueEntry:
        """This entry with new ranked targets (and placement's note with them) and/or a policy
        hold set or cleared."""
        entry = self
        if candidates is not None:
            if self.source_host in candidates:
                raise ValueError(f"{self.migration_id}: the source {self.source_host!r} cannot be a target")
            entry = replace(entry, candidates=tuple(candidates), placement_note=placement_note)
        if clear_policy_block:
            entry = replace(entry, policy_block=None)
        elif policy_block is not None:
            entry = replace(entry, policy_block=policy_block)
        return entry


_ENTRY: TypeAdapter[QueueEntry] = TypeAdapter(QueueEntry)

def new_entry(
    migration_id: str,
    vm_id: str,
    source_host: str,
    candidates: Sequence[str],
    *,
    priority: Priority = Priority.OPERATOR,
    group: str | None = None,
    now: float,
    request: Mapping[str, Any] | None = None,
    placement_note: str | None = None,
) -> QueueEntry:
    """A queued entry; ``group`` defaults to the source host (one share per host).
    ``placement_note``: why no host fits, when ``candidates`` is empty."""
    if source_host in candidates:
        raise ValueError(f"{migration_id}: the source {source_host!r} cannot be a target")
    return QueueEntry(
        migration_id=migration_id,
        vm_id=vm_id,
        source_host=source_host,
        candidates=tuple(candidates),
        priority=Priority(priority),
        group=group or source_host,
        enqueued_at=now,
        request=dict(request or {}),
        placement_note=placement_note,
    )


@dataclass(frozen=True)
class Decision:
    """Where a queued entry stands in the plan: it starts next (``reason`` None, on
    ``target``), or what holds it."""

    entry: QueueEntry
    reason: Reason | None
    target: str | None = None
    effective_priority: int = 0

    @property
    def startable(self) -> bool:
        return self.reason is None
