"""The VM's migration: join the early launch, then follow the pre-copy with dirty rounds
until the hypervisor says it is done."""

from __future__ import annotations

import logging

from ferry_common.errors import Cancelled, FailedOnHost, StepError, TimedOut
from ferry_common.messages.commands import (
    CleanupSource,
    MigrationStarted,
    PerformMigration,
    VmMigrationFinished,
)

from . import postcopy
from .launch import perform_msg
from .management import dirty_round
from .port import expect
from .postcopy import FailedForward
from .run import SagaRun

log = logging.getLogger(__name__)


async def migrate_vm(run: SagaRun) -> None:
    s = run.state
    if s.postcopy_started and s.migration_uri:
        # resumed in post-copy: the target's receiving VM already runs the guest, and a
        # PrepareIncoming would take it for a stale one; the source is asked how it ends
        perform = perform_msg(run, s.migration_uri)
        started = expect(await run.call(run.source, perform), MigrationStarted)
    else:
        prepared, started = await run.launch.join()
        perform = perform_msg(run, prepared.uri)
    if started.postcopy_started:
        await postcopy.began(run, perform.uri)
    result = started.finished
    begun = last_poll = run.clock.monotonic()
    rounds = applied = 0
    limit_s = run.spec.limit_s or run.t.vm_migration_s
    while result is None:
        result = await run.ctx.wait_notification(run.mid, run.t.dirty_round_s)
        if result is not None:
            break
        try:
            now = run.clock.monotonic()
            # past the start of post-copy nothing cancels: it finishes or fails forward
            if not s.postcopy_started and run.cancel_requested():
                raise Cancelled(run.why_cancelled())
            if now - begun > limit_s:
                if s.postcopy_started:  # bounded too: the hosts' states go on the record
                    raise FailedForward(f"post-copy did not finish within {limit_s:g}s")
                raise TimedOut(f"the VM migration did not finish within {limit_s:g}s")
            if rounds < run.t.max_dirty_rounds:
                rounds += 1
                applied += await dirty_round(run, final=False)
            if now - last_poll >= run.t.status_poll_s:
                last_poll = now
                polled = expect(await run.call(run.source, perform), MigrationStarted)
                if polled.postcopy_started:
                    await postcopy.began(run, perform.uri)
                result = polled.finished
                # a cancel that another replica took is only in the store
                fresh = await run.ctx.store.get(run.mid)
                if result is None and fresh is not None and fresh.cancel_requested and not s.postcopy_started:
                    raise Cancelled(run.why_cancelled())
        except StepError:
            if s.postcopy_started or await postcopy.started_meanwhile(run, perform):
                continue  # no rollback: the guest runs on the target only
            if started.source_resumable:
                raise  # the rollback resumes the source even if the hypervisor just finished
            result = await _stop_unresumable(run, perform)
            if result is None or result.outcome != "completed":
                raise
            log.info("migration %s: the hypervisor completed before it could be stopped; going forward", run.mid)
    if result.postcopy_started:
        await postcopy.began(run, perform.uri)
    if result.outcome != "completed" and s.postcopy_started:
        raise FailedForward(f"post-copy failed: {result.reason or result.outcome}")
    if result.outcome == "cancelled":
        raise Cancelled(result.reason or f"VM migration {result.outcome}")
    if result.outcome != "completed":
        raise FailedOnHost(result.reason or f"VM migration {result.outcome}", code="vm_migration_failed")
    if not started.source_resumable:
        # the hypervisor ended the source on completion (libvirt peer-to-peer): the guest runs
        # on the target only, so this is the switch-over and recovery goes forward
        s.vm_switched = True
    s.vm_stats, s.dirty_rounds, s.dirty_applied = dict(result.stats), rounds, applied


async def _stop_unresumable(run: SagaRun, perform: PerformMigration) -> VmMigrationFinished | None:
    """Stop a migration whose source cannot be resumed after completion, and say how it ended.

    Before rolling back, the hypervisor must have stopped: if it completed meanwhile, the
    source is gone and the only copy runs on the target, so the saga must go forward."""
    await run.call(run.source, CleanupSource(migration_id=run.mid, vm_id=run.vm_id), service="hypervisor_adapter")
    again = expect(await run.call(run.source, perform), MigrationStarted)
    return again.finished
