"""One saga run's shared plumbing: the typed state, calls with their retry policy, the
record's writes and the status events. Step bodies receive it; the driver owns it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

from ferry_common.bus.topology import HostService
from ferry_common.errors import Conflict, FerryError, TimedOut
from ferry_common.messages.base import Wire
from ferry_common.messages.commands import Command
from ferry_common.messages.public import MigrationStatusEvent
from ferry_common.messages.public import Status as PublicStatus
from ferry_common.sampler import LatestSender
from ferry_common.telemetry import tracer

from ..store import HistoryEntry, SagaRecord
from .handles import Background
from .interfaces import SagaContext
from .launch import Launch
from .state import SagaState

if TYPE_CHECKING:
    from .plan import Plan

log = logging.getLogger(__name__)


class LostLease(Exception):
    """Another replica took this saga over; this one stops driving it."""


class SagaRun:
    def __init__(self, ctx: SagaContext, record: SagaRecord, plan: Plan) -> None:
        self.ctx = ctx
        self.plan = plan
        self.rec = record
        self.state = SagaState.load(record.data)
        self.clock = ctx.clock
        self.t = ctx.timeouts
        self.spec = plan[record.step] if record.step in plan.names else plan.steps[0]  # the step being run
        # the work that overlaps steps, each started by one step and joined by a later one
        self.launch = Launch(self)
        self.switch: Background[Wire] = Background(f"switch:{self.mid}")
        self.teardown: Background[list[Wire]] = Background(f"teardown:{self.mid}")
        # calls run concurrently (clean-up, teardown) and each may record a retry: saves go
        # one at a time, each on the version the previous one returned
        self._save_lock = asyncio.Lock()
        # progress statuses go out in order beside the steps, not in their way (see status)
        self._progress: LatestSender[MigrationStatusEvent] = LatestSender(
            self._publish, interval_s=self.t.progress_interval_s, clock=self.clock
        )
        self._progress.sent_now()  # `accepted` went out as the saga began
        self.root: trace.Span | None = None

    @property
    def mid(self) -> str:
        return self.rec.migration_id

    @property
    def vm_id(self) -> str:
        return self.rec.vm_id

    @property
    def source(self) -> str:
        return self.rec.source_host

    @property
    def target(self) -> str:
        return self.rec.target_host

    def cancel_requested(self) -> bool:
        return self.rec.cancel_requested or bool(self.ctx.cancel_reason(self.mid))

    def why_cancelled(self) -> str:
        return self.ctx.cancel_reason(self.mid) or "cancelled by operator"

    def span_beside(self, name: str, step: str, host: str) -> Any:
        """A span for background work, under the migration's root rather than the step it began in."""
        parent = trace.set_span_in_context(self.root) if self.root is not None else None
        return tracer.start_as_current_span(
            name, context=parent, attributes={"ferry.migration_id": self.mid, "ferry.step": step, "ferry.host": host})

    # ---- commands ---------------------------------------------------------------------
    async def call(self, host: str, command: Command, *, service: HostService | None = None,
                   answered_by: str = "") -> Wire:
        """Send ``command`` through the port under the current step's timeout and retry policy;
        a retry is recorded before its wait."""
        spec = self.spec
        label = service or type(command).services[0]

        async def once() -> Wire:
            try:
                return await self.ctx.port.call(host, command, timeout_s=spec.reply_s, service=service,
                                                answered_by=answered_by)
            except TimedOut:
                trace.get_current_span().add_event("timeout", {"service": label, "host": host})
                raise

        async def record(attempt: int, exc: BaseException) -> None:
            reason = exc.reason if isinstance(exc, FerryError) else repr(exc)
            await self.save(self.rec.step, "retry", {"service": label, "reason": reason, "attempt": attempt})

        return await spec.retry.run(once, self.clock, on_retry=record)

    async def watched(self, work: Awaitable[None]) -> None:
        """Run ``work`` (a step's body); if the source or the target is marked not ready
        first, stop it and raise :class:`TimedOut` (code ``timeout``, as if its answer never came,
        only sooner): before the switch-over it rolls back, after it it is retried forward."""
        if self.ctx.host_down is None:
            await work
            return
        task = asyncio.ensure_future(work)
        watchers = {asyncio.ensure_future(self.ctx.host_down(h)): h for h in {self.source, self.target} if h}
        try:
            done, _ = await asyncio.wait({task, *watchers}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        finally:
            for w in watchers:
                w.cancel()  # not awaited: nothing of theirs needs cleaning up
        if task in done:
            task.result()
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        down = sorted(h for w, h in watchers.items() if w in done)
        raise TimedOut(f"host {', '.join(down)} is not ready (its hypervisor_adapter, which sends the heartbeats, stopped answering)")

    # ---- the record -------------------------------------------------------------------
    async def save(self, step: str, event: str, detail: dict[str, Any] | None = None, *,
                   then: tuple[str, str] | None = None) -> None:
        async with self._save_lock:
            now = self.clock.now()
            self.rec.history.append(HistoryEntry(now, step, event, detail or {}))
            if then is not None:
                self.rec.history.append(HistoryEntry(now, then[0], then[1], {}))
            self.rec.updated_at = now
            self.rec.data = self.state.dump()
            try:
                self.rec = await self.ctx.store.save(self.rec, owner=self.ctx.owner)
            except Conflict as exc:
                raise LostLease(str(exc)) from None

    # ---- status events ----------------------------------------------------------------
    async def status(self, status: PublicStatus, *, step: str | None = None, reason: str | None = None,
                     code: str | None = None, detail: dict[str, Any] | None = None) -> None:
        event = MigrationStatusEvent(
            migration_id=self.mid, vm_id=self.vm_id, status=status, step=step or None,
            source_host=self.source, target_host=self.target, reason=reason or None, code=code or None,
            detail=detail or {}, at=self.clock.now(),
        )
        if status == "progress":
            # not awaited: a progress status is for people, the record is the truth. It is a
            # sample, not a log: while one is on its way the newest waits and replaces any
            # older one, so a busy broker gets fewer and a follower still sees the step
            self._progress.offer(event)
            return
        # an outcome goes after the progress on its way, and supersedes one still waiting
        self._progress.drop()
        await self._progress.flush()
        await self._publish(event)

    async def _publish(self, event: MigrationStatusEvent) -> None:
        try:
            await self.ctx.publish(event)
        except FerryError as exc:
            log.warning("status %s of %s not published: %s", event.status, self.mid, exc.reason)
