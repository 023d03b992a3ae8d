"""Turning a decided move into work: a queue entry that carries its MigrateRequest and why.

Ids are derived, never drawn: the same move asked twice (a redelivered message, a leader
that enqueued and died before it saved its state) is the same queue entry, which the store
takes once (``FleetQueue.enqueue``: one per id, one live entry per VM).
"""

from __future__ import annotations

import hashlib

from ferry_common.messages.public import MigrateRequest
from ferry_common.messages.recommendations import MoveReason

from ..fleet.queue import Priority, QueueEntry, new_entry
from ..store import SagaStore


def derived_id(prefix: str, *parts: object) -> str:
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:20]
    return f"{prefix}-{digest}"


async def enqueue_move(
    store: SagaStore,
    migration_id: str,
    vm_id: str,
    source: str,
    candidates: tuple[str, ...] | list[str],
    *,
    priority: Priority,
    group: str,
    why: MoveReason,
    now: float,
    note: str | None = None,
) -> tuple[QueueEntry, bool]:
    """Queue the move; its request names the first candidate (the dispatcher may pick another
    of ``candidates`` and sets ``target_host`` when it starts it) and carries ``why``, which
    the saga keeps on its record and its trace."""
    target = candidates[0] if candidates else source
    request = MigrateRequest(vm_id=vm_id, target_host=target, migration_id=migration_id,
                             reason=f"{why.kind}: {why.policy} ({why.level})", why=why)
    entry = new_entry(migration_id, vm_id, source, list(candidates), priority=priority, group=group, now=now,
                      request=request.model_dump(mode="json", exclude_none=True), placement_note=note)
    return await store.queue.enqueue(entry)  # type: ignore[attr-defined]
