"""One migration, run as a saga: the protocol's steps 1-8 and the clean-up on both sides.

The record is saved *before* each step acts, so whichever coordinator replica holds
the saga's lease can resume it after a crash; every step is idempotent on the host
side. Before the guest runs on the target a failure, timeout or cancel rolls back
(target cleaned, source thawed); from then on recovery goes forward only. Once the hypervisor
starts post-copy the guest runs on the target only: the saga goes forward, and a failure of
the migration itself ends ``failed`` (code ``postcopy_failed``), never a pretended rollback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from ferry_common.bus.topology import HOST_SERVICES, host_command, migration_status
from ferry_common.endpoint import Endpoint
from ferry_common.errors import Conflict, FerryError, RemoteError, StepTimeout, Unroutable
from ferry_common.messages.base import Wire
from ferry_common.messages.commands import (
    INCOMING_REFUSALS,
    CleanupSource,
    CleanupTarget,
    CommitReservation,
    Done,
    EventsFrozen,
    ExportDirtyObjects,
    ExportManagementState,
    FetchModules,
    FinishIncoming,
    FreezeEvents,
    IncomingPrepared,
    ManagedObjectInstantiationError,
    ManagementEventStateFailed,
    ManagementEventStateSuccess,
    ManagementStateFailed,
    ManagementStateSuccess,
    MigrationComplete,
    MigrationCompleteAck,
    MigrationDenied,
    MigrationPermitted,
    MigrationStarted,
    MigrationStateSuccess,
    ModulesFetched,
    ModulesRequired,
    PerformMigration,
    PrepareIncoming,
    SendEventState,
    SourceTeardown,
    StageEvents,
    StartMigration,
    VmMigrationFinished,
)
from ferry_common.messages.domain import Module, VmSpec
from ferry_common.messages.public import MigrationStatusEvent
from ferry_common.messages.public import Status as PublicStatus
from ferry_common.sampler import LatestSender
from ferry_common.telemetry import migration_span, trace_ids, tracer

from . import postcopy
from .store import HistoryEntry, SagaRecord, SagaStore
from .timeouts import SagaTimeouts

log = logging.getLogger(__name__)

# The run order: the seed numbers freezing events step 2, before the plane is exported; here the
# plane is exported and the VM pre-copied while the source still acts on events (the changes go
# over in dirty rounds), and events are frozen only once the VM has been copied, so the plane's
# blackout is the switch-over, not the whole migration (docs/protocol.md, "Run order").
STEPS = (
    "admission",
    "management_state",
    "migrate_vm",
    "freeze_events",
    "event_state",
    "switch_over",
    "complete",
    "teardown",
)


class StepFailed(Exception):
    """A step ended in a failure answer, a timeout or a cancel; ``code`` says which."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class LostLease(Exception):
    """Another replica took this saga over; this one stops driving it."""


@dataclass
class SagaContext:
    """What a saga needs from the coordinator that runs it."""

    endpoint: Endpoint
    store: SagaStore
    timeouts: SagaTimeouts
    owner: str
    notify_key: str
    wait_notification: Callable[[str, float], Awaitable[VmMigrationFinished | None]]
    cancel_reason: Callable[[str], str | None]  # set when an operator cancelled (this replica)
    on_finished: Callable[[SagaRecord], Awaitable[None]]
    on_owner: Callable[[str, str, int], None]


class MigrationSaga:
    def __init__(self, ctx: SagaContext, record: SagaRecord) -> None:
        self.ctx = ctx
        self.rec = record
        self.clock = ctx.endpoint.clock
        self.t = ctx.timeouts
        # kept in memory only: rebuilt by going back one step after a restart
        self.element_ids: list[str] | None = None
        # steps call services concurrently (clean-up, teardown) and each call may record a
        # retry: saves go one at a time, each on the version the previous one returned
        self._save_lock = asyncio.Lock()
        # the receiving VM is started, and the VM's migration launched, while the management
        # plane is exported (step 3), off the critical path; step 5 takes their answers (or
        # asks again after a restart)
        self._launch: asyncio.Task[tuple[IncomingPrepared | None, MigrationStarted | None]] | None = None
        self._may_launch = True  # cleared by a rollback: nothing new is started on the hosts then
        # a launch begun beside the admission (the target keeps a receiving process ready)
        # takes that process at once and waits here for the policy's answer before going on
        self._permit: asyncio.Future[bool] | None = None
        # the source's teardown, sent beside the target's activation (step 7); step 8 takes it
        self._teardown: asyncio.Task[list[Wire]] | None = None
        self._switch: asyncio.Task[Wire] | None = None
        # progress statuses go out in order beside the steps, not in their way (see _status)
        self._progress: LatestSender[MigrationStatusEvent] = LatestSender(
            self._publish_status, interval_s=self.t.progress_interval_s, clock=self.clock
        )
        self._progress.sent_now()  # `accepted` went out as the saga began
        self._root: trace.Span | None = None

    @property
    def mid(self) -> str:
        return self.rec.migration_id

    @property
    def source(self) -> str:
        return self.rec.source_host

    @property
    def target(self) -> str:
        return self.rec.target_host

    # ---- driving ----------------------------------------------------------------------
    async def run(self) -> SagaRecord:
        attrs = {
            "ferry.migration_id": self.mid,
            "ferry.vm_id": self.rec.vm_id,
            "ferry.source_host": self.source,
            "ferry.target_host": self.target,
            "ferry.service": self.ctx.endpoint.identity,
        }
        # a new trace per migration (linked to the request); a resumed saga continues it
        resume = (self.rec.data.get("trace_id"), self.rec.data.get("trace_span_id"))
        with migration_span(self.mid, attrs, resume=resume if all(resume) else None) as root:
            self._root = root
            ids = trace_ids(root)
            if ids is not None and "trace_id" not in self.rec.data:
                self.rec.data["trace_id"], self.rec.data["trace_span_id"] = ids  # saved with the next step
            try:
                while not self.rec.terminal:
                    if self.rec.status == "compensating":
                        await self._compensate()
                    else:
                        await self._forward_step()
            except LostLease:
                root.add_event("lease lost", {"owner": self.ctx.owner})
                self._refuse_launch()  # the replica that took over decides; a launch waiting here ends
                return self.rec
            root.set_attribute("ferry.outcome", self.rec.status)
            root.set_attribute("ferry.retry_count", sum(int(n) for n in self.rec.data.get("retries", {}).values()))
            if self.rec.status != "completed":
                root.set_status(Status(StatusCode.ERROR, str(self.rec.data.get("reason", self.rec.status))))
        await self.ctx.on_finished(self.rec)
        return self.rec

    async def _forward_step(self) -> None:
        step = self.rec.step
        switched = bool(self.rec.data.get("vm_switched"))
        retries = int(self.rec.data.get("retries", {}).get(step, 0))
        with tracer.start_as_current_span(
            f"step {step}", attributes={"ferry.migration_id": self.mid, "ferry.step": step, "ferry.retry_count": retries}
        ) as span:
            try:
                if not switched and (self.rec.cancel_requested or self.ctx.cancel_reason(self.mid)):
                    raise StepFailed("cancelled", self._why_cancelled())
                started = self.clock.monotonic()
                last = self.rec.history[-1] if self.rec.history else None
                if last is None or (last.step, last.event) != (step, "started"):
                    await self._save(step, "started")  # else saved with the step before
                await self._status("progress", step=step)
                nxt, data = await getattr(self, f"step_{step}")()
                self.rec.data.update(data)
                span.set_attribute("ferry.outcome", "succeeded")
                self.rec.data.setdefault("timings_ms", {})[step] = round((self.clock.monotonic() - started) * 1000, 3)
                if nxt is None:
                    self.rec.status = "completed"
                    await self._save(step, "succeeded", {"outcome": "completed"})
                    await self._status("completed", step=step, detail=self._summary())
                else:
                    # one write for the step's end and the next one's start: the record says
                    # the same as with two, and the store takes half the writes
                    self.rec.step = nxt
                    await self._save(step, "succeeded", then=(nxt, "started"))
            except postcopy.FailedForward as f:
                span.set_status(Status(StatusCode.ERROR, f.reason))
                span.set_attribute("ferry.outcome", f.code)
                await postcopy.fail_forward(self, step, f)
            except StepFailed as f:
                span.set_status(Status(StatusCode.ERROR, f.reason))
                span.set_attribute("ferry.outcome", f.code)
                if f.code == "timeout":
                    span.add_event("timeout", {"reason": f.reason})
                if switched or self.rec.data.get("vm_switched"):
                    await self._retry_forward(step, f)
                elif step == "admission" and (f.code in ("source_not_allowed", "insufficient_resources", "wrong_host")
                                              or f.code in INCOMING_REFUSALS):
                    # nothing was done yet: a denial is a rejection, not a rollback
                    self.rec.status = "rejected"
                    self.rec.data.update(reason=f.reason, code=f.code, failed_step=step)
                    await self._save(step, "failed", {"code": f.code, "reason": f.reason})
                    await self._status("rejected", step=step, reason=f.reason, code=f.code)
                else:
                    self.rec.status = "compensating"
                    self.rec.data.update(reason=f.reason, code=f.code, failed_step=step)
                    await self._save(step, "failed", {"code": f.code, "reason": f.reason})
                    await self._status("failed", step=step, reason=f.reason, code=f.code)

    def _why_cancelled(self) -> str:
        return self.ctx.cancel_reason(self.mid) or "cancelled by operator"

    async def _retry_forward(self, step: str, f: StepFailed) -> None:
        retries = self.rec.data.setdefault("retries", {})
        retries[step] = int(retries.get(step, 0)) + 1
        await self._save(step, "retry", {"code": f.code, "reason": f.reason, "attempt": retries[step]})
        delay = min(self.t.forward_retry_max_s, self.t.forward_retry_s * 2 ** min(retries[step] - 1, 6))
        await self.clock.sleep(delay)

    async def _compensate(self) -> None:
        with tracer.start_as_current_span(
            "compensate", attributes={"ferry.migration_id": self.mid, "ferry.step": "compensate"}
        ) as span:
            span.add_event("compensation", {"reason": str(self.rec.data.get("reason", ""))})
            await self._save("compensate", "started")
            await self._settle_launch()
            await self._settle_switch()
            if await self._source_lost_after_completion():
                span.add_event("forward", {"reason": "the source VM is gone; its only copy runs on the target"})
                return
            target_ok = await self._cleanup_target()
            await self._cleanup_source()
            self.rec.status = "rolled_back"
            self.rec.data["target_cleanup"] = "done" if target_ok else "queued"
            await self._save("compensate", "compensated", {"target_cleanup": self.rec.data["target_cleanup"]})
            await self._status(
                "rolled_back",
                step=str(self.rec.data.get("failed_step", "")),
                reason=str(self.rec.data.get("reason", "")),
                code=str(self.rec.data.get("code", "")),
            )

    async def _source_lost_after_completion(self) -> bool:
        """Before a rollback destroys the target's copy: if the hypervisor had completed and
        the source guest is gone meanwhile (its process died), the target holds the only
        copy, so the saga goes forward instead, retrying from the failed step until it works."""
        failed = str(self.rec.data.get("failed_step", ""))
        if failed not in ("freeze_events", "event_state", "switch_over") or "vm_stats" not in self.rec.data:
            return False
        try:
            ans = await self._call(self.source, "hypervisor_adapter", CleanupSource(migration_id=self.mid, vm_id=self.rec.vm_id))
        except StepFailed:
            return False  # the source host does not answer: the rollback keeps trying there
        state = ans.detail.get("source_state") if isinstance(ans, Done) else None
        if state not in ("absent", "shutoff"):
            return False  # resumed on the source (or still there): roll back as usual
        self.rec.status, self.rec.step = "running", failed
        self.rec.data["vm_switched"] = True
        await self._save("compensate", "forward", {"reason": f"the source VM is {state}: its only copy is on the target"})
        return True

    async def _cleanup_target(self) -> bool:
        """Tell each target service to drop what it staged; the commands wait in their durable
        queues if a service is down, behind whatever this saga sent it earlier."""
        msg = CleanupTarget(migration_id=self.mid, vm_id=self.rec.vm_id)
        results = await asyncio.gather(
            *(self._cleanup_target_one(s, msg) for s in HOST_SERVICES), return_exceptions=True
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r  # LostLease: another replica finishes the clean-up
        return all(results)

    async def _cleanup_target_one(self, service: str, msg: CleanupTarget) -> bool:
        """True once ``service`` answered; False if the command waits in its durable queue.

        Only a timeout means the command is queued (the broker confirmed it): a publish
        that failed (connection lost) never reached the queue and is sent again.
        """
        attempt = 0
        while True:
            try:
                await self._call(self.target, service, msg)
                return True
            except StepFailed as f:
                if f.code != "transient":
                    log.warning("cleanup of %s on %s pending: %s", service, self.target, f.reason)
                    return False
                attempt += 1
                await self._save("compensate", "retry", {"service": service, "reason": f.reason, "attempt": attempt})
                await self.clock.sleep(min(self.t.forward_retry_max_s, self.t.forward_retry_s * attempt))

    async def _cleanup_source(self) -> None:
        """Source first stops the hypervisor, then unseals the plane, then thaws events."""
        msg = CleanupSource(migration_id=self.mid, vm_id=self.rec.vm_id)
        for service in ("hypervisor_adapter", "managed_object", "sensor"):
            attempt = 0
            while True:
                try:
                    await self._call(self.source, service, msg)
                    break
                except StepFailed as f:
                    # the source must end as it was: keep trying, it is the VM's only home
                    attempt += 1
                    await self._save("compensate", "retry", {"service": service, "reason": f.reason, "attempt": attempt})
                    await self.clock.sleep(min(self.t.forward_retry_max_s, self.t.forward_retry_s * attempt))

    # ---- the steps --------------------------------------------------------------------
    async def step_admission(self) -> tuple[str, dict[str, Any]]:
        vm = VmSpec.model_validate(self.rec.data["vm"])
        if self.rec.data.get("target_ready"):
            # taking a receiving process that already runs starts nothing on the target, so
            # it is asked beside the policy rather than after it; the VM's migration still
            # waits for the permit
            self._start_launch(permitted=False)
        try:
            ans = await self._call(
                self.target,
                "migration_policy",
                StartMigration(migration_id=self.mid, vm_id=vm.vm_id, source_host=self.source, target_host=self.target, vm=vm),
            )
            if isinstance(ans, MigrationDenied):
                raise StepFailed(ans.code, ans.reason)
            ans = _expect(ans, MigrationPermitted)
        except StepFailed:
            await self._release_ready()
            raise
        self._start_launch()
        return "management_state", {"reservation_id": ans.reservation_id}

    async def _release_ready(self) -> None:
        """The admission ended without a permit: a receiving process taken beside it goes
        (a rejection undoes nothing else, since nothing else was started)."""
        if self._launch is None:
            return
        await self._settle_launch()
        msg = CleanupTarget(migration_id=self.mid, vm_id=self.rec.vm_id)
        await self._cleanup_target_one("hypervisor_adapter", msg)

    async def step_freeze_events(self) -> tuple[str, dict[str, Any]]:
        self._start_switch()
        # the target's sensor binds the events' key beside the freeze, not after it: an event
        # that reaches both hosts in between is acted on by the source and its id goes over
        # in the final dirty round, so the target's managed object skips it (the window is
        # one round trip; the dirty rounds carry the last 4,096 ids)
        frozen, _ = await asyncio.gather(
            self._call(self.source, "sensor", FreezeEvents(migration_id=self.mid, vm_id=self.rec.vm_id)),
            self._call(self.target, "sensor", StageEvents(migration_id=self.mid, vm_id=self.rec.vm_id)),
        )
        ans = _expect(frozen, EventsFrozen)
        return "event_state", {"queued_at_freeze": ans.queued}

    async def step_management_state(self) -> tuple[str, dict[str, Any]]:
        vm_id = self.rec.vm_id
        modules: list[Module] = []
        fetched_rounds = 0
        for _ in range(self.t.max_module_rounds):
            # the source exports its plane and forwards it to the target as ManagementState
            # (with the modules fetched so far); the target answers here: the graph goes from
            # host to host once, not through the saga
            ans = await self._call(
                self.source,
                "managed_object",
                ExportManagementState(migration_id=self.mid, vm_id=vm_id, target_host=self.target, modules=modules),
                answered_by=f"managed_object on {self.target}",
            )
            if isinstance(ans, ModulesRequired):
                fetched_rounds += 1
                got = _expect(
                    await self._call(self.source, "managed_object", FetchModules(migration_id=self.mid, vm_id=vm_id, refs=ans.missing)),
                    ModulesFetched,
                )
                have = {(m.name, m.version) for m in got.modules}
                lacking = [r.key for r in ans.missing if (r.name, r.version) not in have]
                if lacking:
                    raise StepFailed("instantiation_error", f"modules unknown on both hosts: {', '.join(lacking)}")
                modules = [*modules, *got.modules]
                continue
            if isinstance(ans, ManagementStateFailed):
                raise StepFailed("management_state_failed", ans.reason)
            if isinstance(ans, ManagedObjectInstantiationError):
                raise StepFailed("instantiation_error", ans.reason)
            ok = _expect(ans, ManagementStateSuccess)
            self.element_ids = ok.element_ids
            # the target fetches what it lacks from the source itself and says so in its answer;
            # rounds made here are those a target without a source to ask sent back
            fetched = dict.fromkeys([*(f"{m.name}@{m.version}" for m in modules), *ok.modules_fetched])
            return "migrate_vm", {"elements": len(ok.element_ids), "module_rounds": fetched_rounds + ok.module_rounds,
                                   "modules_fetched": list(fetched)}
        raise StepFailed("instantiation_error", "module dependencies nested too deep")

    async def step_event_state(self) -> tuple[str, dict[str, Any]]:
        if self.element_ids is None:
            # resumed after a restart: the staged graph's ids come from replaying step 3
            await self.step_management_state()
        vm_id = self.rec.vm_id
        # the target's sensor was staged beside the freeze; the source's sensor sends its
        # queue to the target's as ManagementEventState, and the target answers here: the
        # events go from host to host once, not through the saga.
        # Beside it, the final dirty round: the source acts on nothing since the freeze, and
        # what it acted on until then is in the managed-object service's queue ahead of this
        send = self._call(
            self.source,
            "sensor",
            SendEventState(migration_id=self.mid, vm_id=vm_id, target_host=self.target,
                           element_ids=self.element_ids or []),
            answered_by=f"sensor on {self.target}",
        )
        ans, applied = await _both(send, self._dirty_round(final=True))
        if isinstance(ans, ManagementEventStateFailed):
            raise StepFailed("event_state_failed", ans.reason)
        if isinstance(ans, ManagedObjectInstantiationError):
            raise StepFailed("instantiation_error", ans.reason)
        ok = _expect(ans, ManagementEventStateSuccess)
        return "switch_over", {"events_moved": ok.staged, "final_dirty_applied": applied}

    def _prepare_msg(self, *, ready_only: bool = False) -> PrepareIncoming:
        vm = VmSpec.model_validate(self.rec.data["vm"])
        params = dict(self.rec.data.get("params", {}))
        return PrepareIncoming(migration_id=self.mid, vm_id=vm.vm_id, vm=vm, source_host=self.source, params=params,
                               ready_only=ready_only)

    def _perform_msg(self, uri: str) -> PerformMigration:
        return PerformMigration(migration_id=self.mid, vm_id=self.rec.vm_id, uri=uri, target_host=self.target,
                                params=dict(self.rec.data.get("params", {})), notify=self.ctx.notify_key)

    def _start_launch(self, *, permitted: bool = True) -> None:
        """Start the receiving VM now and, once it listens, the VM's migration, in the
        background (both idempotent on the hosts, and undone by the clean-up): launching QEMU
        takes 50-250 ms and the pre-copy as long as it takes, and neither needs the plane, so
        they run beside the plane's export instead of after it. The dirty rounds start with
        step 5, once the export is through.

        Only where a completed migration can still be undone (the source resumes, the target's
        copy is destroyed): with libvirt's peer-to-peer migration the source is gone once it
        completes, so the VM moves only after the plane was staged on the target.

        Not ``permitted`` (beside the admission): only a receiving process that already runs
        is taken, and the rest waits until a later call permits it or the clean-up refuses."""
        if self._permit is None:
            self._permit = asyncio.get_running_loop().create_future()
        if permitted and not self._permit.done():
            self._permit.set_result(True)
        if self._launch is None:
            self._launch = asyncio.create_task(self._launch_early(self._permit), name=f"launch:{self.mid}")

    async def _launch_early(self, permit: asyncio.Future[bool]) -> tuple[IncomingPrepared | None, MigrationStarted | None]:
        parent = trace.set_span_in_context(self._root) if self._root is not None else None
        attrs = {"ferry.migration_id": self.mid, "ferry.step": "migrate_vm"}
        prepared: IncomingPrepared | None = None
        if not permit.done():
            with tracer.start_as_current_span("take ready incoming", context=parent, attributes={**attrs, "ferry.host": self.target}):
                try:
                    prepared = _expect(await self._call(self.target, "hypervisor_adapter", self._prepare_msg(ready_only=True)),
                                       IncomingPrepared)
                except StepFailed:
                    prepared = None  # asked for properly below, once permitted
            if prepared is not None and not prepared.uri:
                prepared = None  # none was ready after all
        if not await permit:
            return prepared, None
        if prepared is None:
            with tracer.start_as_current_span("prepare incoming", context=parent, attributes={**attrs, "ferry.host": self.target}):
                prepared = _expect(await self._call(self.target, "hypervisor_adapter", self._prepare_msg()), IncomingPrepared)
        if not prepared.source_resumable or not self._may_launch or self.rec.cancel_requested or self.ctx.cancel_reason(self.mid):
            return prepared, None
        with tracer.start_as_current_span("launch migration", context=parent, attributes={**attrs, "ferry.host": self.source}):
            started = _expect(await self._call(self.source, "hypervisor_adapter", self._perform_msg(prepared.uri)), MigrationStarted)
        return prepared, started

    def _refuse_launch(self) -> None:
        """Start nothing more on the hosts: a launch waiting for its permit returns."""
        self._may_launch = False
        if self._permit is not None and not self._permit.done():
            self._permit.set_result(False)

    async def _launched(self) -> tuple[IncomingPrepared, MigrationStarted]:
        """The receiving VM's answer and the started migration's: from the early launch, or
        asked for now (after a restart, or if the early ones were lost on the way; the
        adapters answer a replay from what they recorded)."""
        task, self._launch = self._launch, None
        prepared: IncomingPrepared | None = None
        started: MigrationStarted | None = None
        if task is not None:
            try:
                prepared, started = await task
            except StepFailed as f:
                if f.code not in ("timeout", "transient"):
                    raise
        if prepared is None:
            prepared = _expect(await self._call(self.target, "hypervisor_adapter", self._prepare_msg()), IncomingPrepared)
        if started is None:
            started = _expect(await self._call(self.source, "hypervisor_adapter", self._perform_msg(prepared.uri)), MigrationStarted)
        return prepared, started

    async def _settle_launch(self) -> None:
        """Before cleaning up: start nothing more, and let an early launch be answered (or
        time out), so the clean-up does not overtake the VM or the migration it must undo."""
        self._refuse_launch()
        task, self._launch = self._launch, None
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    async def step_migrate_vm(self) -> tuple[str, dict[str, Any]]:
        if self._in_postcopy and "migration_uri" in self.rec.data:
            # resumed in post-copy: the target's receiving VM already runs the guest, and a
            # PrepareIncoming would take it for a stale one; the source is asked how it ends
            perform = self._perform_msg(str(self.rec.data["migration_uri"]))
            started = _expect(await self._call(self.source, "hypervisor_adapter", perform), MigrationStarted)
        else:
            prepared, started = await self._launched()
            perform = self._perform_msg(prepared.uri)
        if started.postcopy_started:
            await self._postcopy_began(perform.uri)
        result = started.finished
        begun = self.clock.monotonic()
        last_poll = begun
        rounds = applied = 0
        while result is None:
            result = await self.ctx.wait_notification(self.mid, self.t.dirty_round_s)
            if result is not None:
                break
            try:
                now = self.clock.monotonic()
                # past the start of post-copy nothing cancels: it finishes or fails forward
                if not self._in_postcopy and (self.rec.cancel_requested or self.ctx.cancel_reason(self.mid)):
                    raise StepFailed("cancelled", self._why_cancelled())
                if now - begun > self.t.vm_migration_s:
                    if self._in_postcopy:  # bounded too: the hosts' states go on the record
                        raise postcopy.FailedForward("postcopy_failed", f"post-copy did not finish within {self.t.vm_migration_s:g}s")
                    raise StepFailed("timeout", f"the VM migration did not finish within {self.t.vm_migration_s:g}s")
                if rounds < self.t.max_dirty_rounds:
                    rounds += 1
                    applied += await self._dirty_round(final=False)
                if now - last_poll >= self.t.status_poll_s:
                    last_poll = now
                    polled = _expect(await self._call(self.source, "hypervisor_adapter", perform), MigrationStarted)
                    if polled.postcopy_started:
                        await self._postcopy_began(perform.uri)
                    result = polled.finished
                    # a cancel that another replica took is only in the store
                    fresh = await self.ctx.store.get(self.mid)
                    if result is None and fresh is not None and fresh.cancel_requested and not self._in_postcopy:
                        raise StepFailed("cancelled", self._why_cancelled())
            except StepFailed:
                if self._in_postcopy or await postcopy.started_meanwhile(self, perform):
                    continue  # no rollback: the guest runs on the target only
                if started.source_resumable:
                    raise  # the rollback resumes the source even if the hypervisor just finished
                result = await self._stop_unresumable(perform)
                if result is None or result.outcome != "completed":
                    raise
                log.info("migration %s: the hypervisor completed before it could be stopped; going forward", self.mid)
        if result.postcopy_started:
            await self._postcopy_began(perform.uri)
        if result.outcome != "completed":
            if self._in_postcopy:
                raise postcopy.FailedForward("postcopy_failed", f"post-copy failed: {result.reason or result.outcome}")
            code = "cancelled" if result.outcome == "cancelled" else "vm_migration_failed"
            raise StepFailed(code, result.reason or f"VM migration {result.outcome}")
        if not started.source_resumable:
            # the hypervisor ended the source on completion (libvirt peer-to-peer): the guest
            # runs on the target only, so this is the switch-over and recovery goes forward
            self.rec.data["vm_switched"] = True
        return "freeze_events", {"vm_stats": result.stats, "dirty_rounds": rounds, "dirty_applied": applied}

    @property
    def _in_postcopy(self) -> bool:
        return bool(self.rec.data.get("postcopy_started"))

    async def _postcopy_began(self, uri: str) -> None:
        await postcopy.began(self, uri)

    async def _stop_unresumable(self, perform: PerformMigration) -> VmMigrationFinished | None:
        """Stop a migration whose source cannot be resumed after completion, and say how it ended.

        Before rolling back, the hypervisor must have stopped: if it completed meanwhile, the
        source is gone and the only copy runs on the target, so the saga must go forward.
        """
        await self._call(self.source, "hypervisor_adapter", CleanupSource(migration_id=self.mid, vm_id=self.rec.vm_id))
        again = _expect(await self._call(self.source, "hypervisor_adapter", perform), MigrationStarted)
        return again.finished  # type: ignore[no-any-return]

    async def _dirty_round(self, *, final: bool) -> int:
        vm_id = self.rec.vm_id
        # the final round resends everything changed since step 3: an export's answer lost
        # on the way (a timeout, then a retry) took its dirty bits with it, and only this
        # keeps those changes from being lost; the target applies them idempotently
        # host to host: the source sends the round to the target's managed object, which
        # answers here (the source answers itself when nothing changed)
        export = ExportDirtyObjects(migration_id=self.mid, vm_id=vm_id, final=final, since_export=final,
                                    target_host=self.target)
        ans = await self._call(self.source, "managed_object", export, answered_by=f"managed_object on {self.target}")
        if isinstance(ans, ManagementStateFailed):
            raise StepFailed("migration_state_failed", ans.reason)
        return _expect(ans, MigrationStateSuccess).applied

    def _start_switch(self) -> None:
        """Ask the target's adapter to confirm the guest runs there (FinishIncoming) once the
        hypervisor is through, beside the freeze and the event transfer rather than after
        them: the answer is taken at step 6b, which stays the point past which recovery goes
        forward only. Until then a rollback destroys the target's copy, confirmed or not, as
        it does for a copy the hypervisor finished (QEMU resumes it on its own)."""
        if self._switch is None:
            self._switch = asyncio.create_task(self._finish_incoming(), name=f"switch:{self.mid}")

    async def _finish_incoming(self) -> Wire:
        parent = trace.set_span_in_context(self._root) if self._root is not None else None
        with tracer.start_as_current_span(
            "finish incoming", context=parent,
            attributes={"ferry.migration_id": self.mid, "ferry.step": "switch_over", "ferry.host": self.target},
        ):
            return await self._call(self.target, "hypervisor_adapter", FinishIncoming(migration_id=self.mid, vm_id=self.rec.vm_id))

    async def _settle_switch(self) -> None:
        """Before cleaning up: let a FinishIncoming on its way be answered (or time out), so
        the target's clean-up comes after it, not before."""
        task, self._switch = self._switch, None
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    async def step_switch_over(self) -> tuple[str, dict[str, Any]]:
        task, self._switch = self._switch, None
        if task is None:  # resumed after a restart: asked now (the adapter answers a replay alike)
            task = asyncio.create_task(self._finish_incoming())
        await task
        # from here on the guest runs on the target: recovery only goes forward
        self.rec.data["vm_switched"] = True
        # and the plane's ownership moves with it, recorded (in the write that ends this
        # step) before the target hears of it at step 7
        epoch = int(self.rec.data.get("epoch", 0)) + 1
        self.rec.history.append(HistoryEntry(self.clock.now(), "switch_over", "owner", {"owner": self.target, "epoch": epoch}))
        return "complete", {"new_epoch": epoch}

    async def step_complete(self) -> tuple[str, dict[str, Any]]:
        vm_id = self.rec.vm_id
        epoch = self.rec.data["new_epoch"]  # recorded by step 6b
        self.ctx.on_owner(vm_id, self.target, int(epoch))
        # past the switch the source only has to be cleared, and nothing on the target waits
        # for that: its teardown goes now, beside the activation; step 8 takes the answers
        if self._teardown is None:
            self._teardown = asyncio.create_task(self._tear_down(), name=f"teardown:{self.mid}")
        msg = MigrationComplete(migration_id=self.mid, vm_id=vm_id, epoch=int(epoch), lease_s=self.t.ownership_lease_s)
        # the target's managed object activates the plane and its sensor takes the VM's events
        # (the backlog goes out beside the saga's last step); a dispatch that reaches the plane
        # first activates it (it names this migration), so neither waits for the other. The
        # reservation is independent too: all idempotent, and past the switch the saga only
        # goes forward: one round trip for all
        _, ack, _ = await asyncio.gather(
            self._call(self.target, "managed_object", msg),
            self._call(self.target, "sensor", msg),
            self._call(self.target, "migration_policy", CommitReservation(migration_id=self.mid, vm_id=vm_id)),
        )
        ack = _expect(ack, MigrationCompleteAck)
        return "teardown", {"epoch": epoch, "events_dispatched_on_target": ack.dispatched}

    async def step_teardown(self) -> tuple[None, dict[str, Any]]:
        task, self._teardown = self._teardown, None
        if task is not None:
            try:
                await task
                return None, {}
            except StepFailed:
                pass  # asked again below: each service answers a replay from what it recorded
        await self._tear_down()
        return None, {}

    async def _tear_down(self) -> list[Wire]:
        msg = SourceTeardown(migration_id=self.mid, vm_id=self.rec.vm_id)
        parent = trace.set_span_in_context(self._root) if self._root is not None else None
        with tracer.start_as_current_span(
            "source teardown", context=parent,
            attributes={"ferry.migration_id": self.mid, "ferry.step": "teardown", "ferry.host": self.source},
        ):
            services = ("sensor", "managed_object", "hypervisor_adapter")
            return list(await asyncio.gather(*(self._call(self.source, s, msg) for s in services)))

    # ---- plumbing -----------------------------------------------------------------------
    async def _call(self, host: str, service: str, msg: Wire, *, answered_by: str = "") -> Wire:
        """Request ``msg`` of ``service`` on ``host``, with retries; ``answered_by`` names the
        service that answers a request forwarded to it, for the reasons given."""
        key = host_command(host, service)
        who = f"{service} on {host}" + (f" (answered by {answered_by})" if answered_by else "")
        last: StepFailed | None = None
        for attempt in range(1, self.t.attempts + 1):
            try:
                return await self.ctx.endpoint.request(key, msg, timeout=self.t.reply_s)
            except StepTimeout as exc:
                last = StepFailed("timeout", f"{who}: {exc.reason}")
                trace.get_current_span().add_event("timeout", {"service": service, "host": host, "attempt": attempt})
            except Unroutable:
                raise StepFailed("unreachable", f"{who} is not connected") from None
            except RemoteError as exc:
                if not exc.retryable:
                    raise StepFailed(exc.code, f"{who}: {exc.reason}") from None
                last = StepFailed(exc.code, f"{who}: {exc.reason}")
            except FerryError as exc:
                if not exc.retryable:
                    raise StepFailed(exc.code, exc.reason) from None
                last = StepFailed(exc.code, exc.reason)
            if attempt < self.t.attempts:
                await self._save(self.rec.step, "retry", {"service": service, "reason": last.reason, "attempt": attempt})
                await self.clock.sleep(min(0.05 * attempt, 1.0))
        assert last is not None
        raise last

    async def _save(self, step: str, event: str, detail: dict[str, Any] | None = None, *,
                    then: tuple[str, str] | None = None) -> None:
        async with self._save_lock:
            now = self.clock.now()
            self.rec.history.append(HistoryEntry(now, step, event, detail or {}))
            if then is not None:
                self.rec.history.append(HistoryEntry(now, then[0], then[1], {}))
            self.rec.updated_at = now
            try:
                self.rec = await self.ctx.store.save(self.rec, owner=self.ctx.owner)
            except Conflict as exc:
                raise LostLease(str(exc)) from None

    async def _status(self, status: PublicStatus, *, step: str | None = None, reason: str | None = None,
                      code: str | None = None, detail: dict[str, Any] | None = None) -> None:
        event = MigrationStatusEvent(
            migration_id=self.mid,
            vm_id=self.rec.vm_id,
            status=status,
            step=step or None,
            source_host=self.source,
            target_host=self.target,
            reason=reason or None,
            code=code or None,
            detail=detail or {},
            at=self.clock.now(),
        )
        if status == "progress":
            # not awaited: a progress status is for people, the record is the truth. It is a
            # sample, not a log (the record's history is the log): while one is on its way, the
            # newest waits and replaces any older one, so a busy broker gets fewer of them and
            # a follower still sees the step the saga is in
            self._progress.offer(event)
            return
        # an outcome goes after the progress on its way, and supersedes one still waiting
        self._progress.drop()
        await self._progress.flush()
        await self._publish_status(event)

    async def _publish_status(self, event: MigrationStatusEvent) -> None:
        try:
            # nobody may follow this migration (its record still says it all): not mandatory,
            # so the broker drops it instead of returning it
            await self.ctx.endpoint.send(migration_status(event.status), event, mandatory=False)
        except FerryError as exc:
            log.warning("status %s of %s not published: %s", event.status, self.mid, exc.reason)

    def _summary(self) -> dict[str, Any]:
        d = self.rec.data
        keys = ("elements", "events_moved", "events_dispatched_on_target", "dirty_rounds", "vm_stats", "timings_ms", "epoch")
        return {k: d[k] for k in keys if k in d}


async def _both(a: Awaitable[Wire], b: Awaitable[int]) -> tuple[Wire, int]:
    """Run two calls together; if one fails, wait for the other before raising (a step ends
    with nothing of its own still running)."""
    first, second = await asyncio.gather(a, b, return_exceptions=True)
    for r in (first, second):
        if isinstance(r, BaseException):
            raise r
    assert not isinstance(first, BaseException) and not isinstance(second, BaseException)
    return first, second


def _expect(answer: Wire, model: type[Any]) -> Any:
    if not isinstance(answer, model):
        raise StepFailed("protocol_error", f"expected {model.__name__}, got {type(answer).__name__}")
    return answer
