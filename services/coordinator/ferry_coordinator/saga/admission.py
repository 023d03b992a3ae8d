"""Admission: the target's policy permits the migration (and reserves for it) or denies it."""

from __future__ import annotations

from ferry_common.errors import Denied, StepError
from ferry_common.messages.commands import (
    CleanupTarget,
    MigrationDenied,
    MigrationPermitted,
    StartMigration,
)

from .compensation import cleanup_target_one
from .port import expect
from .run import SagaRun


async def admit(run: SagaRun) -> None:
    vm = run.state.vm
    assert vm is not None, "the coordinator stores the VM's spec with the saga"
    if run.state.target_ready:
        # taking a receiving process that already runs starts nothing on the target, so it is
        # asked beside the policy rather than after it; the VM's migration waits for the permit
        run.launch.start(permitted=False)
    try:
        ans = await run.call(run.target, StartMigration(migration_id=run.mid, vm_id=vm.vm_id, source_host=run.source,
                                                        target_host=run.target, vm=vm))
        if isinstance(ans, MigrationDenied):
            raise Denied(ans.reason, code=ans.code)
        permitted = expect(ans, MigrationPermitted)
    except StepError:
        await _release_ready(run)
        raise
    run.launch.start()
    run.state.reservation_id = permitted.reservation_id


async def _release_ready(run: SagaRun) -> None:
    """The admission ended without a permit: a receiving process taken beside it goes
    (a rejection undoes nothing else, since nothing else was started)."""
    if not run.launch.begun:
        return
    await run.launch.settle()
    await cleanup_target_one(run, "hypervisor_adapter", CleanupTarget(migration_id=run.mid, vm_id=run.vm_id))
