"""The driver: walks the plan, one step at a time.

The record is saved *before* each step acts, so whichever coordinator replica holds the
saga's lease can resume it after a crash; every step is idempotent on the host side. Before
the guest runs on the target a failure, timeout or cancel rolls back (target cleaned, source
thawed); from then on recovery goes forward only, retrying the step until it works.
"""

from __future__ import annotations

from opentelemetry.trace import Status, StatusCode

from ferry_common.errors import Cancelled, FerryError, Rejected, StepError, TimedOut
from ferry_common.telemetry import migration_span, trace_ids, tracer

from ..store import SagaRecord
from .compensation import compensate
from .interfaces import SagaContext
from .plan import Plan, StepSpec, build_plan
from .postcopy import FailedForward, fail_forward
from .run import LostLease, SagaRun


class MigrationSaga:
    def __init__(self, ctx: SagaContext, record: SagaRecord, plan: Plan | None = None) -> None:
        self.ctx = ctx
        self.plan = plan or build_plan(ctx.timeouts)
        self.run_ = SagaRun(ctx, record, self.plan)

    @property
    def rec(self) -> SagaRecord:
        return self.run_.rec

    async def run(self) -> SagaRecord:
        r = self.run_
        attrs = {"ferry.migration_id": r.mid, "ferry.vm_id": r.vm_id, "ferry.source_host": r.source,
                 "ferry.target_host": r.target, "ferry.service": self.ctx.identity}
        # a new trace per migration (linked to the request); a resumed saga continues it
        s = r.state
        resume = (s.trace_id, s.trace_span_id) if s.trace_id and s.trace_span_id else None
        link = tuple(s.request_span) if s.request_span and len(s.request_span) == 2 else None
        with migration_span(r.mid, attrs, resume=resume, requested_by=link) as root:  # type: ignore[arg-type]
            r.root = root
            if s.why:  # an automatic migration: why it started, on its trace
                root.set_attributes({f"ferry.why.{k}": str(v) for k, v in s.why.items() if k != "figures"}
                                    | {f"ferry.why.{k}": float(v) for k, v in (s.why.get("figures") or {}).items()})
            ids = trace_ids(root)
            if ids is not None and s.trace_id is None:
                s.trace_id, s.trace_span_id = ids  # saved with the next step
            try:
                while not r.rec.terminal:
                    if r.rec.status == "compensating":
                        await self._compensate()
                    else:
                        await self._forward(self.plan[r.rec.step])
            except LostLease:
                root.add_event("lease lost", {"owner": self.ctx.owner})
                r.launch.refuse()  # the replica that took over decides; a launch waiting here ends
                return r.rec
            root.set_attribute("ferry.outcome", r.rec.status)
            root.set_attribute("ferry.retry_count", sum(s.retries.values()))
            if r.rec.status != "completed":
                root.set_status(Status(StatusCode.ERROR, s.reason or r.rec.status))
        await self.ctx.on_finished(r.rec)
        return r.rec

    async def _forward(self, spec: StepSpec) -> None:
        """Run ``spec``'s step; past the point of no return a failure is recorded and the step
        run again under the plan's forward policy (the count of tries survives a restart)."""
        r = self.run_
        r.spec = spec

        async def record(attempt: int, exc: BaseException) -> None:
            f = exc if isinstance(exc, FerryError) else StepError(repr(exc))
            await r.save(spec.name, "retry", {"code": f.code, "reason": f.reason, "attempt": r.state.retried(spec.name)})

        await self.plan.forward.run(lambda: self._attempt(spec), r.clock, retry_on=lambda e: isinstance(e, StepError),
                                    on_retry=record, first_retry=r.state.retries.get(spec.name, 0) + 1)

    async def _attempt(self, spec: StepSpec) -> None:
        r, step = self.run_, spec.name
        switched = r.state.switched
        attrs: dict[str, str | int] = {"ferry.migration_id": r.mid, "ferry.step": step,
                                      "ferry.retry_count": r.state.retries.get(step, 0)}
        with tracer.start_as_current_span(f"step {step}", attributes=attrs, record_exception=False,
                                          set_status_on_exception=False) as span:
            try:
                if not switched and r.cancel_requested():
                    raise Cancelled(r.why_cancelled())
                started = r.clock.monotonic()
                last = r.rec.history[-1] if r.rec.history else None
                if last is None or (last.step, last.event) != (step, "started"):
                    await r.save(step, "started")  # else saved with the step before
                await r.status("progress", step=step)
                await r.watched(spec.body(r))
                span.set_attribute("ferry.outcome", "succeeded")
                r.state.timings_ms[step] = round((r.clock.monotonic() - started) * 1000, 3)
                nxt = self.plan.after(step)
                if nxt is None:
                    r.rec.status = "completed"
                    await r.save(step, "succeeded", {"outcome": "completed"})
                    await r.status("completed", step=step, detail=r.state.summary())
                else:
                    # one write for the step's end and the next one's start: the record says the
                    # same as with two, and the store takes half the writes
                    r.rec.step = nxt
                    await r.save(step, "succeeded", then=(nxt, "started"))
            except FailedForward as f:
                span.set_status(Status(StatusCode.ERROR, f.reason))
                span.set_attribute("ferry.outcome", f.code)
                await fail_forward(r, step, f)
            except StepError as f:
                span.set_status(Status(StatusCode.ERROR, f.reason))
                span.set_attribute("ferry.outcome", f.code)
                if isinstance(f, TimedOut):
                    span.add_event("timeout", {"reason": f.reason})
                if spec.forward_only or switched or r.state.switched:
                    raise  # the guest runs on the target: retried forward, never undone
                r.state.failed(step, f.code, f.reason)
                # a refusal before anything was done is a rejection, not a rollback
                r.rec.status = "rejected" if isinstance(f, Rejected) else "compensating"
                await r.save(step, "failed", {"code": f.code, "reason": f.reason})
                await r.status("rejected" if isinstance(f, Rejected) else "failed", step=step, reason=f.reason, code=f.code)

    async def _compensate(self) -> None:
        r = self.run_
        with tracer.start_as_current_span(
            "compensate", attributes={"ferry.migration_id": r.mid, "ferry.step": "compensate"}
        ) as span:
            span.add_event("compensation", {"reason": r.state.reason or ""})
            if not await compensate(r):
                span.add_event("forward", {"reason": "the source VM is gone; its only copy runs on the target"})
