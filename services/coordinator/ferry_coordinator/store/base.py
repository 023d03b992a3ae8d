"""The saga store interface.

The coordinator writes a saga's state and history here *before* it acts on a step,
so that any replica can resume it after a crash. Writes are guarded twice: by the
record's ``version`` (optimistic concurrency) and by the driving replica's lease
(``owner``/``lease_until``), so one saga is driven by one replica at a time.
"""

from __future__ import annotations

import abc
import builtins
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, get_args

from ferry_coordinator.fleet.drain import Drain, DrainState
from ferry_coordinator.fleet.queue import Decision, EntryState, Limits, QueueEntry

from .ledger import Ledger

Change = Callable[[QueueEntry], QueueEntry]

# failed: ended forward-only after post-copy started, neither completed nor rolled back
SagaStatus = Literal["running", "compensating", "completed", "rolled_back", "rejected", "failed"]
TERMINAL = frozenset({"completed", "rolled_back", "rejected", "failed"})


def as_status(raw: str) -> SagaStatus:
    """A stored status, checked: the one place a string becomes a saga status."""
    if raw not in get_args(SagaStatus):
        raise ValueError(f"unknown saga status {raw!r}")
    return raw  # type: ignore[return-value]


@dataclass
class HistoryEntry:
    """One thing that happened in a saga; the list of them replays the saga."""

    at: float
    step: str
    event: str  # started | succeeded | failed | timeout | compensated | retry | note | postcopy_started
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at, "step": self.step, "event": self.event, "detail": self.detail}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> HistoryEntry:
        return cls(float(raw["at"]), str(raw["step"]), str(raw["event"]), dict(raw.get("detail") or {}))


@dataclass
class SagaRecord:
    """A migration saga as stored: where it is, what it knows, what happened."""

    migration_id: str
    vm_id: str
    source_host: str
    target_host: str
    status: SagaStatus = "running"
    step: str = "admission"
    data: dict[str, Any] = field(default_factory=dict)
    history: list[HistoryEntry] = field(default_factory=list)
    cancel_requested: bool = False
    created_at: float = 0.0
    updated_at: float = 0.0
    owner: str | None = None
    lease_until: float = 0.0
    version: int = 0

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        return {
            "migration_id": self.migration_id,
            "vm_id": self.vm_id,
            "source_host": self.source_host,
            "target_host": self.target_host,
            "status": self.status,
            "step": self.step,
            "data": self.data,
            "history": [h.to_dict() for h in self.history],
            "cancel_requested": self.cancel_requested,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "owner": self.owner,
            "lease_until": self.lease_until,
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SagaRecord:
        return cls(
            migration_id=raw["migration_id"],
            vm_id=raw["vm_id"],
            source_host=raw["source_host"],
            target_host=raw["target_host"],
            status=as_status(raw.get("status", "running")),
            step=raw.get("step", "admission"),
            data=dict(raw.get("data") or {}),
            history=[HistoryEntry.from_dict(h) for h in raw.get("history") or []],
            cancel_requested=bool(raw.get("cancel_requested", False)),
            created_at=float(raw.get("created_at", 0.0)),
            updated_at=float(raw.get("updated_at", 0.0)),
            owner=raw.get("owner"),
            lease_until=float(raw.get("lease_until", 0.0)),
            version=int(raw.get("version", 0)),
        )


class FleetQueue(abc.ABC):
    """Queued migrations and the slots they hold, in the saga store (so every replica sees one
    queue). Every backend passes ``tests/contract/fleet_queue_suite.py`` unchanged.

    A slot is an entry in state ``started``: taken by :meth:`claim_next`, given back by
    :meth:`release` or, in the same transaction, when the saga of that ``migration_id`` is
    saved in a terminal state. A backend implements the storage; what an update or a cancel
    does to an entry is decided here, once, on top of :meth:`change_queued`.
    """

    @abc.abstractmethod
    async def limits(self) -> Limits:
        """The limits in force (the defaults until :meth:`set_limits`)."""

    @abc.abstractmethod
    async def set_limits(self, limits: Limits) -> Limits:
        """Change the limits for every replica from the next claim on; slots already held
        stay held (a lowered limit drains down rather than aborting migrations)."""

    @abc.abstractmethod
    async def enqueue(self, entry: QueueEntry) -> tuple[QueueEntry, bool]:
        """Insert ``entry`` (state queued) unless an entry with its id exists or a live one
        (queued or started) exists for its VM: then ``(existing, False)``."""

    @abc.abstractmethod
    async def get(self, migration_id: str) -> QueueEntry | None: ...

    @abc.abstractmethod
    async def entries(
        self, *, states: Collection[EntryState] | None = None, group: str | None = None
    ) -> builtins.list[QueueEntry]:
        """Entries, oldest first, optionally of some states or one group."""

    @abc.abstractmethod
    async def claim_next(self, owner: str, *, now: float) -> QueueEntry | None:
        """In one transaction: pick the next startable entry (``fleet.scheduling.start_next``),
        check the limits against the slots held, and take its slot (state started, with its
        target). None when nothing can start. Never exceeds a limit, whatever the number of
        replicas claiming at once; an entry starts at most once.

        The claimer then creates the saga under the entry's ``migration_id``. A claimer that
        dies in between leaves a started entry without a saga: whoever takes over resumes it
        from ``entry.request`` (or releases it); it is never started a second time."""

    @abc.abstractmethod
    async def release(self, migration_id: str, *, now: float) -> QueueEntry | None:
        """Give back the slot of a started entry (state done); idempotent."""

    @abc.abstractmethod
    async def change_queued(self, migration_id: str, change: Change) -> QueueEntry | None:
        """Atomically replace a queued entry by ``change(entry)``; an entry in another state
        is returned unchanged, an unknown one as None."""

    async def cancel(self, migration_id: str, *, now: float) -> QueueEntry | None:
        """Cancel a queued entry: it never starts. A started one is returned unchanged (its
        saga's cancel path applies). None if unknown."""
        return await self.change_queued(
            migration_id, lambda e: replace(e, state=EntryState.CANCELLED, ended_at=now)
        )

    async def update_queued(
        self,
        migration_id: str,
        *,
        candidates: Sequence[str] | None = None,
        placement_note: str | None = None,
        policy_block: str | None = None,
        clear_policy_block: bool = False,
    ) -> QueueEntry | None:
        """Refresh a queued entry's ranked targets (placement ran again; with none, its note
        says why per host) or mark it held by policy; entries in other states are returned
        unchanged."""
        return await self.change_queued(
            migration_id, lambda e: e.updated(candidates, policy_block, clear_policy_block, placement_note)
        )

    @abc.abstractmethod
    async def explain(self, *, now: float) -> builtins.list[Decision]:
        """Every queued entry in start order with what holds it (``migration.queued``)."""


class DrainStore(Protocol):
    """Host drains (``fleet.drain.Drain``), in the store that holds the fleet queue, so a
    drain's writes and its queue entries change in one transaction.

    At most one drain per host is ``draining``. Saves are guarded by the drain's ``version``."""

    async def create(self, drain: Drain) -> tuple[Drain, bool]:
        """Insert ``drain`` unless one with its id exists or its host has an active drain:
        then ``(existing, False)``."""

    async def get(self, drain_id: str) -> Drain | None: ...

    async def latest(self, host: str) -> Drain | None:
        """The host's newest drain."""

    async def list(self, *, active: bool = False) -> builtins.list[Drain]:
        """Oldest first; only those ``draining`` if ``active``."""

    async def open(self) -> builtins.list[Drain]:
        """Oldest first: those draining, and those ended whose migrations still run."""

    async def save(self, drain: Drain) -> Drain:
        """Write ``drain`` if its version is current (returned incremented); ``Conflict`` if not."""

    async def enqueue(self, drain_id: str, entry: QueueEntry) -> QueueEntry | None:
        """In one transaction with the drain's state: enqueue ``entry`` (as ``FleetQueue.enqueue``)
        only while the drain is ``draining``; None otherwise. A cancel can then never be
        followed by a migration the drain queued."""

    async def cancel(
        self, drain_id: str, *, now: float, reason: str, state: DrainState = DrainState.CANCELLED
    ) -> Drain | None:
        """In one transaction: the drain ended in ``state`` (cancelled, or failed when its
        deadline passed) if it was draining, and every queued entry of its group cancelled.
        Returns the drain as stored, None if unknown."""

    async def cordoned(self) -> set[str]:
        """Hosts placement must skip: those whose latest drain keeps them cordoned."""


class SagaStore(Protocol):
    """Every backend implements this and passes ``tests/contract/store_suite.py`` unchanged."""

    @property
    def queue(self) -> FleetQueue:
        """The fleet queue kept in this store (same storage, same transactions)."""

    @property
    def drains(self) -> DrainStore:
        """Host drains, in the same storage as the queue."""

    @property
    def balancer(self) -> Ledger:
        """The autonomic balancer's row (its lease, state and recommendations)."""

    async def close(self) -> None: ...

    async def create(self, record: SagaRecord) -> tuple[SagaRecord, bool]:
        """Insert ``record`` unless a saga with its id exists or, when ``record`` is not terminal,
        a non-terminal saga for its VM exists (a terminal record, a rejection, always goes in).

        Returns ``(stored, created)``: the new record and True, or the existing one and False.
        """

    async def get(self, migration_id: str) -> SagaRecord | None: ...

    async def save(self, record: SagaRecord, *, owner: str | None) -> SagaRecord:
        """Write ``record`` if its ``version`` is current and ``owner`` holds its lease
        (or nobody does); returns it with ``version`` incremented. Raises ``Conflict`` otherwise."""

    async def list(self, *, vm_id: str | None = None, limit: int = 50) -> builtins.list[SagaRecord]:
        """Newest first."""

    async def active_for_vm(self, vm_id: str) -> SagaRecord | None: ...

    async def claim(self, owner: str, *, now: float, lease_s: float, limit: int = 100) -> builtins.list[SagaRecord]:
        """Take the lease of non-terminal sagas that nobody holds or whose lease expired.

        A holder keeps a live lease with :meth:`renew`; claiming bumps the version.
        """

    async def renew(self, migration_id: str, owner: str, *, until: float) -> bool:
        """Extend ``owner``'s lease; False if it lost it."""

    async def request_cancel(self, migration_id: str) -> SagaRecord | None:
        """Mark the saga for cancellation (whichever replica drives it will see it)."""

    async def add_spans(self, migration_id: str, spans: builtins.list[dict[str, Any]]) -> None:
        """Keep finished spans of a migration's trace, for ``ferry trace``."""

    async def spans(self, migration_id: str) -> builtins.list[dict[str, Any]]: ...
