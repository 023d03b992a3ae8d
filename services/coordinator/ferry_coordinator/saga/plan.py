"""The migration saga, declared: its steps in run order, what each sends, how long it waits
and how hard it tries, whether it only goes forward, and the work it starts early.

The plane is exported and the VM pre-copied while the source still acts on events (the
changes go over in dirty rounds); events are frozen only once the VM has been copied, so
the plane's blackout is the switch-over, not the whole migration (docs/protocol.md maps
these names to the protocol's numbered steps). ``python -m ferry_coordinator.saga``
prints it with each command's host service and accepted answers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from ferry_common.messages.commands import (
    CleanupSource,
    CleanupTarget,
    CommitReservation,
    ExportDirtyObjects,
    ExportManagementState,
    FetchModules,
    FinishIncoming,
    FreezeEvents,
    MigrationComplete,
    PerformMigration,
    PrepareIncoming,
    SendEventState,
    SourceTeardown,
    StageEvents,
    StartMigration,
    Step,
)
from ferry_common.retry import RetryPolicy

from ..timeouts import SagaTimeouts
from .admission import admit
from .management import export_plane, freeze_events, move_events
from .run import SagaRun
from .switchover import complete, switch_over, teardown
from .vm import migrate_vm

Handle = Literal["launch", "switch", "teardown"]


@dataclass(frozen=True)
class Early:
    """Work a step starts in the background (a typed handle on the run), and the step that
    joins it; the compensation settles it first."""

    handle: Handle
    what: str
    joined_at: str


@dataclass(frozen=True)
class StepSpec:
    name: str
    body: Callable[[SagaRun], Awaitable[None]]
    sends: tuple[type[Step], ...]  # each command declares its host service and the answers it takes
    reply_s: float  # how long each request waits for its answer
    retry: RetryPolicy  # how a request whose answer was lost is sent again
    forward_only: bool = False  # past the point of no return: a failure is retried, never undone
    limit_s: float | None = None  # the whole step's bound, where it waits on more than a reply
    starts: Early | None = None


LAUNCH = Early("launch", "the receiving VM, then (once permitted) the VM's pre-copy", joined_at="migrate_vm")
SWITCH = Early("switch", "the target confirming that the guest runs there", joined_at="switch_over")
TEARDOWN = Early("teardown", "the source's teardown, beside the plane's activation", joined_at="teardown")


@dataclass(frozen=True)
class Plan:
    steps: tuple[StepSpec, ...]
    forward: RetryPolicy  # a forward-only step that failed, until it works
    cleanup: RetryPolicy  # a clean-up command, until it answers (or is queued)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.steps)

    def __getitem__(self, name: str) -> StepSpec:
        return next(s for s in self.steps if s.name == name)

    def after(self, name: str) -> str | None:
        names = self.names
        i = names.index(name)
        return names[i + 1] if i + 1 < len(names) else None


@lru_cache(maxsize=8)
def build_plan(t: SagaTimeouts) -> Plan:
    call = RetryPolicy(attempts=t.attempts, backoff_s=0.05, max_s=1.0)  # steps are idempotent on the hosts

    def step(name: str, body: Callable[[SagaRun], Awaitable[None]], *sends: type[Step], **kw: object) -> StepSpec:
        return StepSpec(name, body, sends, t.reply_s, call, **kw)  # type: ignore[arg-type]

    return Plan(
        steps=(
            step("admission", admit, StartMigration, PrepareIncoming, CleanupTarget, starts=LAUNCH),
            step("management_state", export_plane, ExportManagementState, FetchModules),
            step("migrate_vm", migrate_vm, PrepareIncoming, PerformMigration, ExportDirtyObjects, CleanupSource,
                 limit_s=t.vm_migration_s),
            step("freeze_events", freeze_events, FreezeEvents, StageEvents, starts=SWITCH),
            step("event_state", move_events, SendEventState, ExportDirtyObjects),
            step("switch_over", switch_over, FinishIncoming),  # its answer is the point of no return
            step("complete", complete, MigrationComplete, CommitReservation, forward_only=True, starts=TEARDOWN),
            step("teardown", teardown, SourceTeardown, forward_only=True),
        ),
        forward=RetryPolicy(attempts=None, backoff_s=t.forward_retry_s, max_s=t.forward_retry_max_s, growth="exponential"),
        cleanup=RetryPolicy(attempts=None, backoff_s=t.forward_retry_s, max_s=t.forward_retry_max_s),
    )


STEPS = tuple(s.name for s in build_plan(SagaTimeouts()).steps)


def describe(plan: Plan) -> str:
    """The plan as a table: each step, what it sends where and accepts back, and its policies."""
    lines = []
    for s in plan.steps:
        retry = f"{s.retry.attempts} tries, {s.retry.growth} {s.retry.backoff_s:g}s..{s.retry.max_s:g}s"
        flags = " forward-only" if s.forward_only else ""
        early = f"; starts {s.starts.handle} ({s.starts.what}), joined at {s.starts.joined_at}" if s.starts else ""
        lines.append(f"{s.name}: replies within {s.reply_s:g}s, {retry}{flags}{early}")
        for c in s.sends:
            lines.append(f"    {c.__name__} -> {'/'.join(c.services)}: {' | '.join(r.__name__ for r in c.replies)}")
    f = plan.forward
    lines.append(f"forward retry: until it works, {f.growth} {f.backoff_s:g}s..{f.max_s:g}s")
    return "\n".join(lines)
