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
from .launch import Launch
from .port import expect
from .run import SagaRun


async def admit(run: SagaRun) -> None:
    """Admission on the target; a placed migration whose target denies it tries the next
    target placement ranked (``alternatives``, bounded), each denial on the record."""
    while True:
        try:
            await _admit_once(run)
            return
        except Denied as denied:
            extra = run.state.model_extra if run.state.model_extra is not None else {}
            left = list(extra.get("alternatives") or [])
            if not left:
                raise
            denials = list(extra.get("denials") or [])
            denials.append({"host": run.target, "code": denied.code, "reason": denied.reason})
            extra["denials"], extra["alternatives"] = denials, left[1:]
            run.rec.target_host = left[0]
            run.state.target_ready = False  # a hint of the first target's
            run.launch = Launch(run)
            await run.save("admission", "note", {"denied": denials[-1], "next_target": left[0]})


async def _admit_once(run: SagaRun) -> None:
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
