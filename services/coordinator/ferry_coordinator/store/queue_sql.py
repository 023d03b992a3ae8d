"""What the SQL fleet queues share: the live-state filter and the row mapping.

An entry is one row: the columns a query filters on (id, vm_id, state, grp) and the whole
entry as a JSON body. The limits are one row (id 1) of their own, which PostgreSQL's claim
also locks to serialize claimers.
"""

from __future__ import annotations

from typing import Any

from ferry_coordinator.fleet.queue import LIVE_STATES, EntryState, Limits, QueueEntry

# inlined, as TERMINAL_SQL: a partial index's WHERE clause must be a constant expression
LIVE_SQL = "(" + ",".join(f"'{s.value}'" for s in sorted(LIVE_STATES)) + ")"

QUEUED = EntryState.QUEUED.value
STARTED = EntryState.STARTED.value


def queue_schema(*, real: str, json: str) -> str:
    """The tables, in the dialect's names for a float and a JSON body."""
    return f"""
CREATE TABLE IF NOT EXISTS ferry_fleet_queue (
    id          TEXT PRIMARY KEY,
    vm_id       TEXT NOT NULL,
    state       TEXT NOT NULL,
    grp         TEXT NOT NULL,
    enqueued_at {real} NOT NULL,
    body        {json} NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS ferry_fleet_queue_one_live_per_vm
    ON ferry_fleet_queue (vm_id) WHERE state IN {LIVE_SQL};
CREATE INDEX IF NOT EXISTS ferry_fleet_queue_live ON ferry_fleet_queue (state)
    WHERE state IN {LIVE_SQL};
CREATE INDEX IF NOT EXISTS ferry_fleet_queue_grp ON ferry_fleet_queue (grp, enqueued_at);
CREATE TABLE IF NOT EXISTS ferry_fleet_limits (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    body {json} NOT NULL
);
"""


def row_params(entry: QueueEntry) -> tuple[str, str, str, str, float, dict[str, Any]]:
    """``(id, vm_id, state, grp, enqueued_at, body)`` of ``entry``."""
    return (
        entry.migration_id,
        entry.vm_id,
        entry.state.value,
        entry.group,
        entry.enqueued_at,
        entry.to_dict(),
    )


def entry_from(body: dict[str, Any]) -> QueueEntry:
    return QueueEntry.from_dict(body)


def default_limits() -> dict[str, Any]:
    return Limits().to_dict()
