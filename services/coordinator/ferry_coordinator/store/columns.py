"""What the SQL stores share: the columns, the terminal statuses as SQL, and the row mapping.

Fields a query filters on are real columns; the rest of a record is one JSON blob.
"""

from __future__ import annotations

from typing import Any

from .base import TERMINAL, HistoryEntry, SagaRecord, as_status

# Inlined (not bound) because a partial index's WHERE clause must be a constant expression,
# and a query uses that index only when its own WHERE clause visibly implies it.
TERMINAL_SQL = "(" + ",".join(f"'{s}'" for s in sorted(TERMINAL)) + ")"

COLUMNS = "id, vm_id, status, owner, lease_until, version, created_at, updated_at, cancel_requested, body"


def blob(record: SagaRecord) -> dict[str, Any]:
    """The part of ``record`` that no query filters on."""
    return {
        "source_host": record.source_host,
        "target_host": record.target_host,
        "step": record.step,
        "data": record.data,
        "history": [h.to_dict() for h in record.history],
    }


def record_from(row: Any, body: dict[str, Any]) -> SagaRecord:
    """A record from a row in ``COLUMNS`` order (or with those names) and its decoded blob."""
    mid, vm_id, status, owner, lease_until, version, created, updated, cancel = (row[i] for i in range(9))
    return SagaRecord(
        migration_id=mid,
        vm_id=vm_id,
        source_host=body["source_host"],
        target_host=body["target_host"],
        status=as_status(status),
        step=body["step"],
        data=body["data"],
        history=[HistoryEntry.from_dict(h) for h in body["history"]],
        cancel_requested=bool(cancel),
        created_at=float(created),
        updated_at=float(updated),
        owner=owner,
        lease_until=float(lease_until),
        version=int(version),
    )
