"""The saga past the start of post-copy: forward only, and ``failed`` if the migration breaks.

Once the hypervisor switches to post-copy the guest runs on the target and the source's memory
is stale, so there is nothing to roll back to. The saga records that moment (a
``postcopy_started`` history entry, ``data.postcopy_started`` and ``vm_switched``, a span event
and ``ferry.postcopy`` on the migration's root span); a failure of the migration then ends the
saga ``failed`` with code ``postcopy_failed`` and the VM's state on each host
(docs/guarantees.md, "Post-copy"). Kept apart from the saga's steps: these are its hooks.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from opentelemetry import trace

from ferry_common.messages.commands import Inspect, Inspection, MigrationStarted, PerformMigration

if TYPE_CHECKING:
    from .saga import MigrationSaga


class FailedForward(Exception):
    """A step failed past the point of no return that is not the switch-over: the hypervisor
    had started post-copy, so the source no longer holds a runnable guest. The saga ends
    ``failed`` (never a pretended rollback), with ``code`` and the VM's state on each host.
    Not a ``StepFailed``: nothing that handles those (a rollback, a retry) may take it."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


async def began(saga: MigrationSaga, uri: str) -> None:
    """Record, once, that the hypervisor switched to post-copy (``uri``: the stream's, so a
    resumed saga asks the source about it without preparing the target again)."""
    if saga.rec.data.get("postcopy_started"):
        return
    saga.rec.data.update(postcopy_started=True, vm_switched=True, migration_uri=uri)
    await saga._save("migrate_vm", "postcopy_started", {"reason": "pre-copy did not converge on the ladder"})
    trace.get_current_span().add_event("postcopy_started")
    if saga._root is not None:
        saga._root.set_attribute("ferry.postcopy", True)
        saga._root.add_event("postcopy_started", {"ferry.migration_id": saga.mid})


async def started_meanwhile(saga: MigrationSaga, perform: PerformMigration) -> bool:
    """Before rolling back from the VM step: did post-copy start meanwhile? (The saga learns
    it at its polls; a rollback then would destroy the only running guest.)"""
    from .saga import StepFailed  # the saga imports this module

    try:
        answer = await saga._call(saga.source, "hypervisor_adapter", perform)
    except StepFailed:
        return False  # the source does not answer: its clean-up decides (it refuses in post-copy)
    if isinstance(answer, MigrationStarted) and answer.postcopy_started:
        await began(saga, perform.uri)
    return bool(saga.rec.data.get("postcopy_started"))


async def fail_forward(saga: MigrationSaga, step: str, f: FailedForward) -> None:
    """End ``failed``: nothing is rolled back, and the record says where the VM is."""
    states = await vm_states(saga)
    saga.rec.status = "failed"
    saga.rec.data.update(reason=f.reason, code=f.code, failed_step=step, vm_state=states)
    await saga._save(step, "failed", {"code": f.code, "reason": f.reason, "vm_state": states})
    await saga._status("failed", step=step, reason=f.reason, code=f.code, detail={"vm_state": states})


async def vm_states(saga: MigrationSaga) -> dict[str, str]:
    """The VM's state on the source and the target as their adapters see it (``unknown`` where
    one does not answer)."""

    from .saga import StepFailed  # the saga imports this module

    async def one(host: str) -> str:
        try:
            answer = await saga._call(host, "hypervisor_adapter", Inspect(vm_id=saga.rec.vm_id))
        except StepFailed:
            return "unknown"
        vms = answer.data.get("vms") if isinstance(answer, Inspection) else None
        return str(vms.get(saga.rec.vm_id, "unknown")) if isinstance(vms, dict) else "unknown"

    source, target = await asyncio.gather(one(saga.source), one(saga.target))
    return {saga.source: source, saga.target: target}
