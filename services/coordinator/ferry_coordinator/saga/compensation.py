"""The rollback: undo on the target what the saga staged there, and leave the source as it
was (the seed's two clean-up procedures)."""

from __future__ import annotations

import asyncio
import logging

from ferry_common.bus.topology import HOST_SERVICES, HostService
from ferry_common.errors import FerryError, SendFailed, StepError
from ferry_common.messages.commands import (
    CleanupSource,
    CleanupTarget,
    Done,
)

from .run import SagaRun

log = logging.getLogger(__name__)

# the hypervisor is stopped first, then the plane unsealed, then the events thawed
SOURCE_ORDER: tuple[HostService, ...] = ("hypervisor_adapter", "managed_object", "sensor")
# the failed steps past which the hypervisor may have completed (the source may be gone)
_AFTER_VM = ("freeze_events", "event_state", "switch_over")


async def compensate(run: SagaRun) -> bool:
    """Roll back; False if the source's guest is gone, so the saga goes forward instead."""
    await run.save("compensate", "started")
    await run.launch.settle()
    await run.switch.settle()
    if await _source_lost_after_completion(run):
        return False
    target_ok = await _cleanup_target(run)
    await _cleanup_source(run)
    run.rec.status = "rolled_back"
    run.state.target_cleanup = "done" if target_ok else "queued"
    await run.save("compensate", "compensated", {"target_cleanup": run.state.target_cleanup})
    await run.status("rolled_back", step=run.state.failed_step or "", reason=run.state.reason or "",
                     code=run.state.code or "")
    return True


async def _source_lost_after_completion(run: SagaRun) -> bool:
    """Before a rollback destroys the target's copy: if the hypervisor had completed and the
    source guest is gone meanwhile (its process died), the target holds the only copy, so the
    saga goes forward instead, retrying from the failed step until it works."""
    failed = run.state.failed_step or ""
    if failed not in _AFTER_VM or run.state.vm_stats is None:
        return False
    try:
        ans = await run.call(run.source, CleanupSource(migration_id=run.mid, vm_id=run.vm_id),
                             service="hypervisor_adapter")
    except StepError:
        return False  # the source host does not answer: the rollback keeps trying there
    state = ans.detail.get("source_state") if isinstance(ans, Done) else None
    if state not in ("absent", "shutoff"):
        return False  # resumed on the source (or still there): roll back as usual
    run.rec.status, run.rec.step = "running", failed
    run.state.vm_switched = True
    await run.save("compensate", "forward", {"reason": f"the source VM is {state}: its only copy is on the target"})
    return True


async def _cleanup_target(run: SagaRun) -> bool:
    """Tell each target service to drop what it staged; the commands wait in their durable
    queues if a service is down, behind whatever this saga sent it earlier."""
    msg = CleanupTarget(migration_id=run.mid, vm_id=run.vm_id)
    results = await asyncio.gather(*(cleanup_target_one(run, s, msg) for s in HOST_SERVICES), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r  # LostLease: another replica finishes the clean-up
    return all(results)


async def cleanup_target_one(run: SagaRun, service: HostService, msg: CleanupTarget) -> bool:
    """True once ``service`` answered; False if the command waits in its durable queue.

    Only a timeout means the command is queued (the broker confirmed it): a publish that
    failed (connection lost) never reached the queue and is sent again."""
    async def record(attempt: int, exc: BaseException) -> None:
        reason = exc.reason if isinstance(exc, FerryError) else repr(exc)
        await run.save("compensate", "retry", {"service": service, "reason": reason, "attempt": attempt})

    try:
        await run.plan.cleanup.run(lambda: run.call(run.target, msg, service=service), run.clock,
                                      retry_on=lambda e: isinstance(e, SendFailed), on_retry=record)
        return True
    except StepError as f:
        log.warning("cleanup of %s on %s pending: %s", service, run.target, f.reason)
        return False


async def _cleanup_source(run: SagaRun) -> None:
    """The source must end as it was: each service is asked until it answers, it is the
    VM's only home."""
    msg = CleanupSource(migration_id=run.mid, vm_id=run.vm_id)
    for service in SOURCE_ORDER:
        await _until_answered(run, service, msg)


async def _until_answered(run: SagaRun, service: HostService, msg: CleanupSource) -> None:
    async def record(attempt: int, exc: BaseException) -> None:
        reason = exc.reason if isinstance(exc, FerryError) else repr(exc)
        await run.save("compensate", "retry", {"service": service, "reason": reason, "attempt": attempt})

    await run.plan.cleanup.run(lambda: run.call(run.source, msg, service=service), run.clock,
                                  retry_on=lambda e: isinstance(e, StepError), on_retry=record)
