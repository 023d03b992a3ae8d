"""The saga past the start of post-copy: forward only, and ``failed`` if the migration breaks.

Once the hypervisor switches to post-copy the guest runs on the target and the source's memory
is stale, so there is nothing to roll back to. The saga records that moment (a
``postcopy_started`` history entry, ``postcopy_started`` and ``vm_switched`` in its state, a span
event and ``ferry.postcopy`` on the migration's root span); a failure of the migration then ends
the saga ``failed`` with code ``postcopy_failed`` and the VM's state on each host
(docs/guarantees.md, "Post-copy").
"""

from __future__ import annotations

import asyncio

from opentelemetry import trace

from ferry_common.errors import FerryError, StepError
from ferry_common.messages.commands import Inspect, Inspection, MigrationStarted, PerformMigration

from .run import SagaRun


class FailedForward(FerryError):
    """A failure past post-copy's start: the source holds no runnable guest, so the saga ends
    ``failed`` (never a pretended rollback). Not a :class:`StepError`: nothing that retries or
    compensates those may take it."""

    code = "postcopy_failed"
    retryable = False


async def began(run: SagaRun, uri: str) -> None:
    """Record, once, that the hypervisor switched to post-copy (``uri``: the stream's, so a
    resumed saga asks the source about it without preparing the target again)."""
    s = run.state
    if s.postcopy_started:
        return
    s.postcopy_started, s.vm_switched, s.migration_uri = True, True, uri
    await run.save("migrate_vm", "postcopy_started", {"reason": "pre-copy did not converge on the ladder"})
    trace.get_current_span().add_event("postcopy_started")
    if run.root is not None:
        run.root.set_attribute("ferry.postcopy", True)
        run.root.add_event("postcopy_started", {"ferry.migration_id": run.mid})


async def started_meanwhile(run: SagaRun, perform: PerformMigration) -> bool:
    """Before rolling back from the VM step: did post-copy start meanwhile? (The saga learns
    it at its polls; a rollback then would destroy the only running guest.)"""
    try:
        answer = await run.call(run.source, perform)
    except StepError:
        return False  # the source does not answer: its clean-up decides (it refuses in post-copy)
    if isinstance(answer, MigrationStarted) and answer.postcopy_started:
        await began(run, perform.uri)
    return bool(run.state.postcopy_started)


async def fail_forward(run: SagaRun, step: str, f: FailedForward) -> None:
    """End ``failed``: nothing is rolled back, and the record says where the VM is."""
    states = await vm_states(run)
    run.state.failed(step, f.code, f.reason)
    run.state.vm_state = states
    run.rec.status = "failed"
    await run.save(step, "failed", {"code": f.code, "reason": f.reason, "vm_state": states})
    await run.status("failed", step=step, reason=f.reason, code=f.code, detail={"vm_state": states})


async def vm_states(run: SagaRun) -> dict[str, str]:
    """The VM's state on the source and the target as their adapters see it (``unknown`` where
    one does not answer)."""

    async def one(host: str) -> str:
        try:
            answer = await run.call(host, Inspect(vm_id=run.vm_id), service="hypervisor_adapter")
        except StepError:
            return "unknown"
        vms = answer.data.get("vms") if isinstance(answer, Inspection) else None
        return str(vms.get(run.vm_id, "unknown")) if isinstance(vms, dict) else "unknown"

    source, target = await asyncio.gather(one(run.source), one(run.target))
    return {run.source: source, run.target: target}
