"""The in-process saga store (demo, unit tests)."""

from __future__ import annotations

import builtins
import copy
from typing import Any

import orjson

from ferry_common.errors import Conflict

from .base import SagaRecord
from .drains_memory import MemoryDrainStore
from .ledger import MemoryLedger
from .queue_memory import MemoryFleetQueue


def _copy(record: SagaRecord) -> SagaRecord:
    # through JSON, as the durable stores do: faster than deepcopy, and as strict
    return SagaRecord.from_dict(orjson.loads(orjson.dumps(record.to_dict())))


class MemorySagaStore:
    def __init__(self) -> None:
        self._rows: dict[str, SagaRecord] = {}
        self._active: dict[str, str] = {}  # vm id -> its non-terminal saga
        self._spans: dict[str, list[dict[str, Any]]] = {}
        self.queue = MemoryFleetQueue()
        self.drains = MemoryDrainStore(self.queue)
        self.balancer = MemoryLedger()  # every replica sharing this store shares its row

    def _index(self, record: SagaRecord) -> None:
        if record.terminal:
            if self._active.get(record.vm_id) == record.migration_id:
                del self._active[record.vm_id]
        else:
            self._active[record.vm_id] = record.migration_id

    async def close(self) -> None:
        return None

    async def create(self, record: SagaRecord) -> tuple[SagaRecord, bool]:
        existing = self._rows.get(record.migration_id)
        if existing is not None:
            return _copy(existing), False
        active = None if record.terminal else await self.active_for_vm(record.vm_id)
        if active is not None:
            return active, False
        stored = _copy(record)
        stored.version = 1
        self._rows[record.migration_id] = stored
        self._index(stored)
        if stored.terminal:  # the saga ended: its slot, if it held one, is free
            self.queue.release_now(stored.migration_id, stored.updated_at)
        return _copy(stored), True

    async def get(self, migration_id: str) -> SagaRecord | None:
        row = self._rows.get(migration_id)
        return _copy(row) if row else None

    async def save(self, record: SagaRecord, *, owner: str | None) -> SagaRecord:
        row = self._rows.get(record.migration_id)
        if row is None:
            raise Conflict(f"saga {record.migration_id} does not exist")
        if row.version != record.version:
            raise Conflict(f"saga {record.migration_id} changed (version {row.version}, not {record.version})")
        if row.owner is not None and owner is not None and row.owner != owner:
            raise Conflict(f"saga {record.migration_id} is driven by {row.owner}")
        stored = _copy(record)
        stored.version = row.version + 1
        stored.owner, stored.lease_until = row.owner, row.lease_until
        stored.cancel_requested = row.cancel_requested or record.cancel_requested
        self._rows[record.migration_id] = stored
        self._index(stored)
        if stored.terminal:  # the saga ended: its slot, if it held one, is free
            self.queue.release_now(stored.migration_id, stored.updated_at)
        return _copy(stored)

    async def list(self, *, vm_id: str | None = None, limit: int = 50) -> builtins.list[SagaRecord]:
        rows = [r for r in self._rows.values() if vm_id is None or r.vm_id == vm_id]
        rows.sort(key=lambda r: (r.created_at, r.migration_id), reverse=True)
        return [_copy(r) for r in rows[:limit]]

    async def active_for_vm(self, vm_id: str) -> SagaRecord | None:
        mid = self._active.get(vm_id)
        return _copy(self._rows[mid]) if mid is not None else None

    async def claim(self, owner: str, *, now: float, lease_s: float, limit: int = 100) -> builtins.list[SagaRecord]:
        out: builtins.list[SagaRecord] = []
        for r in self._rows.values():
            if r.terminal or len(out) >= limit:
                continue
            if r.owner is None or r.lease_until < now:
                r.owner, r.lease_until = owner, now + lease_s
                r.version += 1
                out.append(_copy(r))
        return out

    async def renew(self, migration_id: str, owner: str, *, until: float) -> bool:
        r = self._rows.get(migration_id)
        if r is None or r.owner != owner:
            return False
        r.lease_until = until
        return True

    async def request_cancel(self, migration_id: str) -> SagaRecord | None:
        r = self._rows.get(migration_id)
        if r is None:
            return None
        if not r.terminal:
            r.cancel_requested = True  # no version bump: the driver's next save merges the flag
        return _copy(r)

    async def add_spans(self, migration_id: str, spans: builtins.list[dict[str, Any]]) -> None:
        self._spans.setdefault(migration_id, []).extend(copy.deepcopy(spans))

    async def spans(self, migration_id: str) -> builtins.list[dict[str, Any]]:
        return copy.deepcopy(self._spans.get(migration_id, []))
