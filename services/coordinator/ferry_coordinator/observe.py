"""The coordinator's fleet metrics, taken from a saga's record when it ends.

Read from the stored record rather than counted as the saga runs, so a saga that a
replica took over mid-way is still observed exactly once, with the step timings the
earlier replica persisted.
"""

from __future__ import annotations

from ferry_common import metrics

from .saga.state import SagaState
from .store import SagaRecord


def migration_finished(rec: SagaRecord) -> None:
    """Count ``rec``'s outcome and observe its duration, step timings and VM downtime."""
    metrics.MIGRATIONS_TOTAL.labels(outcome=rec.status).inc()
    if rec.created_at and rec.updated_at >= rec.created_at:
        metrics.MIGRATION_DURATION_SECONDS.observe(rec.updated_at - rec.created_at)
    state = SagaState.load(rec.data)
    for step, ms in state.timings_ms.items():
        metrics.MIGRATION_STEP_SECONDS.labels(step=step).observe(ms / 1000)
    downtime = (state.vm_stats or {}).get("downtime_ms")
    if rec.status == "completed" and isinstance(downtime, int | float):
        metrics.VM_DOWNTIME_SECONDS.observe(downtime / 1000)


def migration_rejected() -> None:
    """A MigrateRequest refused before any saga ran (unknown VM or host, already migrating)."""
    metrics.MIGRATIONS_TOTAL.labels(outcome="rejected").inc()
