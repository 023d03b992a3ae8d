"""The receiving VM and the VM's pre-copy, started early and joined by the VM's migration.

Launching QEMU takes 50-250 ms and the pre-copy as long as it takes, and neither needs the
management plane, so once admission permits they run beside the plane's export instead of
after it. A target that keeps a receiving process ready lets admission take it beside the
policy's answer (starting nothing), the rest waiting for the permit. Only where a completed
migration can still be undone (the source resumes): with libvirt's peer-to-peer migration the
source is gone once it completes, so the VM moves only after the plane was staged.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ferry_common.errors import SendFailed, StepError, TimedOut
from ferry_common.messages.commands import (
    IncomingPrepared,
    MigrationStarted,
    PerformMigration,
    PrepareIncoming,
)

from .port import expect

if TYPE_CHECKING:
    from .run import SagaRun

Launched = tuple[IncomingPrepared | None, MigrationStarted | None]


def prepare_msg(run: SagaRun, *, ready_only: bool = False) -> PrepareIncoming:
    vm = run.state.vm
    assert vm is not None, "the coordinator stores the VM's spec with the saga"
    return PrepareIncoming(migration_id=run.mid, vm_id=vm.vm_id, vm=vm, source_host=run.source,
                           params=dict(run.state.params), ready_only=ready_only)


def perform_msg(run: SagaRun, uri: str) -> PerformMigration:
    return PerformMigration(migration_id=run.mid, vm_id=run.vm_id, uri=uri, target_host=run.target,
                            params=dict(run.state.params), notify=run.ctx.notify_key)


class Launch:
    """Started by admission, joined by the VM's migration, settled by the compensation."""

    def __init__(self, run: SagaRun) -> None:
        self.run = run
        self._task: asyncio.Task[Launched] | None = None
        self._permit: asyncio.Future[bool] | None = None
        self._may_launch = True  # cleared by a rollback: nothing new is started on the hosts then

    @property
    def begun(self) -> bool:
        return self._task is not None

    def start(self, *, permitted: bool = True) -> None:
        """Not ``permitted`` (beside the admission): only a receiving process that already
        runs is taken; the rest waits until a later call permits it or a rollback refuses."""
        if self._permit is None:
            self._permit = asyncio.get_running_loop().create_future()
        if permitted and not self._permit.done():
            self._permit.set_result(True)
        if self._task is None:
            self._task = asyncio.create_task(self._early(self._permit), name=f"launch:{self.run.mid}")

    def refuse(self) -> None:
        """Start nothing more on the hosts: a launch waiting for its permit returns."""
        self._may_launch = False
        if self._permit is not None and not self._permit.done():
            self._permit.set_result(False)

    async def settle(self) -> None:
        """Before cleaning up: start nothing more, and let an early launch be answered (or
        time out), so the clean-up does not overtake the VM or the migration it must undo."""
        self.refuse()
        task, self._task = self._task, None
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    async def join(self) -> tuple[IncomingPrepared, MigrationStarted]:
        """The receiving VM's answer and the started migration's: from the early launch, or
        asked for now (after a restart, or if the early ones were lost on the way; the
        adapters answer a replay from what they recorded)."""
        run = self.run
        task, self._task = self._task, None
        prepared: IncomingPrepared | None = None
        started: MigrationStarted | None = None
        if task is not None:
            try:
                prepared, started = await task
            except (TimedOut, SendFailed):
                pass
        if prepared is None:
            prepared = expect(await run.call(run.target, prepare_msg(run)), IncomingPrepared)
        if started is None:
            started = expect(await run.call(run.source, perform_msg(run, prepared.uri)), MigrationStarted)
        return prepared, started

    async def _early(self, permit: asyncio.Future[bool]) -> Launched:
        run = self.run
        prepared: IncomingPrepared | None = None
        if not permit.done():
            with run.span_beside("take ready incoming", "migrate_vm", run.target):
                try:
                    prepared = expect(await run.call(run.target, prepare_msg(run, ready_only=True)), IncomingPrepared)
                except StepError:
                    prepared = None  # asked for properly below, once permitted
            if prepared is not None and not prepared.uri:
                prepared = None  # none was ready after all
        if not await permit:
            return prepared, None
        if prepared is None:
            with run.span_beside("prepare incoming", "migrate_vm", run.target):
                prepared = expect(await run.call(run.target, prepare_msg(run)), IncomingPrepared)
        if not prepared.source_resumable or not self._may_launch or run.cancel_requested():
            return prepared, None
        with run.span_beside("launch migration", "migrate_vm", run.source):
            started = expect(await run.call(run.source, perform_msg(run, prepared.uri)), MigrationStarted)
        return prepared, started
