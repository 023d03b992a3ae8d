"""Switch-over and completion: the guest confirmed on the target (the point of no return),
the plane activated there, the source torn down."""

from __future__ import annotations

import asyncio

from ferry_common.errors import StepError
from ferry_common.messages.base import Wire
from ferry_common.messages.commands import (
    CommitReservation,
    FinishIncoming,
    MigrationComplete,
    MigrationCompleteAck,
    SourceTeardown,
)

from ..store import HistoryEntry
from .port import expect
from .run import SagaRun


def start_switch(run: SagaRun) -> None:
    """Ask the target's adapter to confirm the guest runs there (FinishIncoming) once the
    hypervisor is through, beside the freeze and the event transfer rather than after them:
    the switch-over takes the answer and stays the point past which recovery goes forward
    only. Until then a rollback destroys the target's copy, confirmed or not, as it does for
    a copy the hypervisor finished (QEMU resumes it on its own)."""
    run.switch.start(lambda: _finish_incoming(run))


async def _finish_incoming(run: SagaRun) -> Wire:
    with run.span_beside("finish incoming", "switch_over", run.target):
        return await run.call(run.target, FinishIncoming(migration_id=run.mid, vm_id=run.vm_id))


async def switch_over(run: SagaRun) -> None:
    task = run.switch.take()
    if task is None:  # resumed after a restart: asked now (the adapter answers a replay alike)
        task = asyncio.ensure_future(_finish_incoming(run))
    await task
    # from here on the guest runs on the target: recovery only goes forward
    run.state.vm_switched = True
    # and the plane's ownership moves with it, recorded (in the write that ends this step)
    # before the target hears of it at the completion
    epoch = (run.state.epoch or 0) + 1
    run.rec.history.append(HistoryEntry(run.clock.now(), "switch_over", "owner", {"owner": run.target, "epoch": epoch}))
    run.state.new_epoch = epoch


async def complete(run: SagaRun) -> None:
    epoch = run.state.new_epoch
    assert epoch is not None, "recorded by the switch-over"
    run.ctx.on_owner(run.vm_id, run.target, epoch)
    # past the switch the source only has to be cleared, and nothing on the target waits for
    # that: its teardown goes now, beside the activation; the teardown step takes the answers
    run.teardown.start(lambda: _tear_down(run))
    msg = MigrationComplete(migration_id=run.mid, vm_id=run.vm_id, epoch=epoch, lease_s=run.t.ownership_lease_s)
    # the target's managed object activates the plane and its sensor takes the VM's events (the
    # backlog goes out beside the saga's last step); a dispatch that reaches the plane first
    # activates it (it names this migration), so neither waits for the other. The reservation
    # is independent too: all idempotent, and past the switch the saga only goes forward
    _, ack, _ = await asyncio.gather(
        run.call(run.target, msg, service="managed_object"),
        run.call(run.target, msg, service="sensor"),
        run.call(run.target, CommitReservation(migration_id=run.mid, vm_id=run.vm_id)),
    )
    run.state.epoch = epoch
    run.state.events_dispatched_on_target = expect(ack, MigrationCompleteAck).dispatched


async def teardown(run: SagaRun) -> None:
    task = run.teardown.take()
    if task is not None:
        try:
            await task
            return
        except StepError:
            pass  # asked again below: each service answers a replay from what it recorded
    await _tear_down(run)


async def _tear_down(run: SagaRun) -> list[Wire]:
    msg = SourceTeardown(migration_id=run.mid, vm_id=run.vm_id)
    with run.span_beside("source teardown", "teardown", run.source):
        return list(await asyncio.gather(*(run.call(run.source, msg, service=s) for s in SourceTeardown.services)))
