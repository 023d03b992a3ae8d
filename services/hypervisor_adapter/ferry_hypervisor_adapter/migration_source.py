"""Migration, source side (step 5): the hypervisor's migration run in a task of its own.

``PerformMigration`` is answered at once; the migration's task publishes its progress and,
at the end, ``VmMigrationFinished`` to the saga's notify key. Its record is kept across
restarts: a replayed ``PerformMigration`` never starts a second migration, it answers with
how the first one stands, so a coordinator that lost the notification (or restarted) learns
the outcome by asking again. Once post-copy started, the source is never cancelled or resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from ferry_common.bus.topology import migration_status
from ferry_common.endpoint import Context
from ferry_common.errors import FerryError
from ferry_common.messages.base import Wire
from ferry_common.messages.commands import (
    CleanupSource,
    Done,
    MigrationStarted,
    PerformMigration,
    SourceTeardown,
    VmMigrationFinished,
)
from ferry_common.messages.public import MigrationStatusEvent
from ferry_common.sampler import LatestSender
from ferry_common.telemetry import tracer

from .drivers import MigrationParams, MigrationProgress, MigrationResult

if TYPE_CHECKING:
    from .service import HypervisorAdapterService

log = logging.getLogger(__name__)


@dataclass
class Outgoing:
    migration_id: str
    vm_id: str
    target_host: str
    notify: str | None
    task: asyncio.Task[None] | None = None
    result: VmMigrationFinished | None = None
    progress: list[dict[str, Any]] = field(default_factory=list)
    postcopy_started: bool = False  # saved: after it the migration is never cancelled or resumed


class MigrationSource:
    """The source-side migration steps of one hypervisor adapter; its records are the
    service's ``outgoing``."""

    def __init__(self, svc: HypervisorAdapterService) -> None:
        self.svc = svc

    async def restore(self) -> None:
        for mid, raw in await self.svc.state.items("outgoing"):
            out = Outgoing(mid, raw["vm_id"], raw["target_host"], raw.get("notify"),
                           postcopy_started=bool(raw.get("postcopy_started")))
            if raw.get("result"):
                out.result = VmMigrationFinished.model_validate(raw["result"])
            else:
                # the migration's follower died with us: make sure the hypervisor stops too,
                # and answer the saga's next PerformMigration with what became of it
                if await self.svc.driver.state(out.vm_id) == "postmigrate":
                    out.result = VmMigrationFinished(migration_id=mid, vm_id=out.vm_id, outcome="completed")
                else:
                    await self.svc.driver.cancel_migration(out.vm_id)
                    out.result = VmMigrationFinished(
                        migration_id=mid, vm_id=out.vm_id, outcome="failed",
                        reason="the hypervisor adapter restarted during the migration",
                        postcopy_started=out.postcopy_started,
                    )
                await self.save(out)
            self.svc.outgoing[mid] = out

    async def save(self, out: Outgoing) -> None:
        await self.svc.state.put("outgoing", out.migration_id, {
            "vm_id": out.vm_id,
            "target_host": out.target_host,
            "notify": out.notify,
            "result": out.result.model_dump(mode="json") if out.result else None,
            "postcopy_started": out.postcopy_started,
        })

    async def on_perform(self, msg: PerformMigration, ctx: Context) -> Wire:
        out = self.svc.outgoing.get(msg.migration_id)
        if out is not None:
            if msg.notify and msg.notify != out.notify:
                out.notify = msg.notify
                await self.save(out)
            return MigrationStarted(already=True, finished=out.result, source_resumable=self.svc.source_resumable,
                                    postcopy_started=out.postcopy_started)
        # no state check here: every driver's migrate refuses a guest that is not running
        # (a failed result, rolled back like any other), and asking the hypervisor first
        # would put one more round trip to it between the permit and the copy
        params = MigrationParams.from_dict(dict(msg.params))  # bad values refused before anything is recorded
        out = Outgoing(msg.migration_id, msg.vm_id, msg.target_host, msg.notify)
        self.svc.outgoing[msg.migration_id] = out
        await self.save(out)
        out.task = asyncio.create_task(self._migrate(out, msg.uri, params))
        return MigrationStarted(source_resumable=self.svc.source_resumable)

    async def _migrate(self, out: Outgoing, uri: str, params: MigrationParams) -> None:
        # the task inherited the PerformMigration handler's context: this span, and the
        # progress and finish messages sent under it, stay in the migration's trace
        attrs = {"ferry.migration_id": out.migration_id, "ferry.vm_id": out.vm_id, "ferry.source_host": self.svc.host,
                 "ferry.target_host": out.target_host, "ferry.service": self.svc.endpoint.identity}
        with tracer.start_as_current_span(f"hypervisor migrate {out.vm_id}", attributes=attrs) as span:
            await self._run_migration(out, uri, params)
            if out.result is not None:
                span.set_attribute("ferry.outcome", out.result.outcome)
                if out.result.outcome != "completed":
                    span.set_status(Status(StatusCode.ERROR, out.result.reason or out.result.outcome))

    async def _run_migration(self, out: Outgoing, uri: str, params: MigrationParams) -> None:
        # the driver's watch hands its samples over and goes on: a slow broker neither delays
        # its polls and timeouts nor the notice that the migration ended
        progress: LatestSender[MigrationStatusEvent] = LatestSender(self._publish_progress)

        async def on_progress(p: MigrationProgress) -> None:
            out.progress.append(p.to_dict())
            trace.get_current_span().add_event("progress", p.to_dict())
            if p.postcopy and not out.postcopy_started:
                out.postcopy_started = True
                trace.get_current_span().add_event("postcopy_started", {"rung": p.rung})
                await self.save(out)  # before the saga can ask: never cancelled from here on
            event = MigrationStatusEvent(
                migration_id=out.migration_id,
                vm_id=out.vm_id,
                status="progress",
                step="migrate_vm",
                source_host=self.svc.host,
                target_host=out.target_host,
                detail=p.to_dict(),
                at=self.svc.endpoint.clock.now(),
            )
            progress.offer(event)

        try:
            result = await self.svc.driver.migrate(out.vm_id, uri, params, on_progress)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("migration %s failed in the driver", out.migration_id)
            result = MigrationResult("failed", f"driver error: {exc}")
        out.result = VmMigrationFinished(
            migration_id=out.migration_id,
            vm_id=out.vm_id,
            outcome=result.outcome,
            reason=result.reason,
            stats=result.stats,
            postcopy_started=result.postcopy_started or out.postcopy_started,
        )
        await self.save(out)
        if out.notify:
            try:
                await self.svc.endpoint.send(out.notify, out.result)
            except FerryError as exc:
                # the saga asks again with PerformMigration and gets the result then
                log.info("finish of %s not delivered: %s", out.migration_id, exc.reason)
        await progress.flush()

    async def _publish_progress(self, event: MigrationStatusEvent) -> None:
        with contextlib.suppress(FerryError):
            await self.svc.endpoint.send(migration_status("progress"), event, mandatory=False)

    async def on_cleanup_source(self, msg: CleanupSource, ctx: Context) -> Done:
        out = self.svc.outgoing.get(msg.migration_id)
        if out is None or (out.task is None and out.result is None):
            # the saga gave up before the migration started here (this host was down): its
            # PerformMigration, still queued behind this clean-up, must find it over
            out = out or Outgoing(msg.migration_id, msg.vm_id, "", None)
            out.result = VmMigrationFinished(migration_id=msg.migration_id, vm_id=msg.vm_id, outcome="failed",
                                             reason="rolled back before the migration started")
            self.svc.outgoing[msg.migration_id] = out
            await self.save(out)
        if out is not None and out.postcopy_started:
            # the guest's memory is split between the hosts, the newest on the target: nothing
            # here may be cancelled or resumed (a resumed source would run stale memory)
            state = await self.svc.driver.state(msg.vm_id)
            return Done(detail={"source_state": state, "postcopy_started": True})
        await self.svc.driver.cancel_migration(msg.vm_id)
        if out is not None and out.task is not None and not out.task.done():
            # the driver ends a cancelled migration within a poll interval; don't wait forever
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(out.task), 30)
        state = await self.svc.driver.state(msg.vm_id)
        if state == "postmigrate":
            # the hypervisor finished just as the saga gave up: the guest resumes here and
            # the target's copy is torn down by the target's own clean-up
            await self.svc.driver.cancel_migration(msg.vm_id)
            state = await self.svc.driver.state(msg.vm_id)
        return Done(detail={"source_state": state})

    async def on_teardown(self, msg: SourceTeardown, ctx: Context) -> Done:
        await self.svc.driver.confirm_source(msg.vm_id)
        self.svc.outgoing.pop(msg.migration_id, None)
        await self.svc.state.delete("outgoing", msg.migration_id)
        self.svc.announce()
        return Done()
