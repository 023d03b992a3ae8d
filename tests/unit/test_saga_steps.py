"""The saga's steps against a scripted command port: no bus, no hosts."""

from __future__ import annotations

from ferry_common.errors import FailedOnHost, TimedOut
from ferry_common.messages.commands import (
    HOST_SERVICES,
    EventsFrozen,
    MigrationCompleteAck,
    MigrationDenied,
    MigrationStarted,
)
from ferry_coordinator.saga.state import SagaState
from ferry_coordinator.timeouts import SagaTimeouts

from .saga_fakes import MID, SOURCE, TARGET, VM, finished, harness, raises

ROLLBACK_SOURCE = [(SOURCE, s, "CleanupSource") for s in ("hypervisor_adapter", "managed_object", "sensor")]


async def test_a_migration_runs_the_plan_in_order() -> None:
    h = harness()
    rec = await h.run()
    assert rec.status == "completed"
    started = [step for step, event in h.events(rec) if event == "started"]
    assert started == ["admission", "management_state", "migrate_vm", "freeze_events", "event_state",
                       "switch_over", "complete", "teardown"]
    state = SagaState.load(rec.data)
    # the staged graph's ids are in the record: a resumed event transfer needs nothing replayed
    assert state.element_ids == [VM, f"{VM}.disk"] and state.new_epoch == 1 and state.events_moved == 3
    assert not h.port.sent("CleanupTarget") and not h.port.sent("CleanupSource")


async def test_admission_denied_rejects_and_releases_only_the_ready_receiver() -> None:
    h = harness({"StartMigration": lambda c: MigrationDenied(code="insufficient_resources", reason="full")})
    rec = await h.run(target_ready=True)
    assert rec.status == "rejected"
    state = SagaState.load(rec.data)
    assert (state.code, state.failed_step) == ("insufficient_resources", "admission")
    # the receiving process taken beside the policy goes; nothing else was started to undo
    assert h.port.sent("PrepareIncoming") == [(TARGET, "hypervisor_adapter", "PrepareIncoming")]
    assert h.port.sent("CleanupTarget") == [(TARGET, "hypervisor_adapter", "CleanupTarget")]
    assert not h.port.sent("CleanupSource") and not h.port.sent("PerformMigration")
    assert [s.status for s in h.statuses if s.status != "progress"] == ["rejected"]
    assert ("compensate", "started") not in h.events(rec)


async def test_a_failure_before_the_switch_compensates_target_then_source_in_order() -> None:
    h = harness({"ExportManagementState": raises(FailedOnHost("bad graph", code="management_state_failed"))})
    rec = await h.run()
    assert rec.status == "rolled_back"
    state = SagaState.load(rec.data)
    assert (state.code, state.failed_step, state.target_cleanup) == ("management_state_failed", "management_state", "done")
    cleanups = [c for c in h.port.calls if c[2] in ("CleanupTarget", "CleanupSource")]
    # every target service drops what it staged, then the source is left as it was, in order
    assert sorted(cleanups[:4]) == sorted((TARGET, s, "CleanupTarget") for s in HOST_SERVICES)
    assert cleanups[4:] == ROLLBACK_SOURCE
    assert h.events(rec, "compensate") == [("compensate", "started"), ("compensate", "compensated")]
    assert [s.status for s in h.statuses if s.status != "progress"] == ["failed", "rolled_back"]


async def test_a_failed_vm_migration_rolls_back() -> None:
    h = harness({"PerformMigration": lambda c: MigrationStarted(finished=finished("failed"))})
    rec = await h.run()
    assert rec.status == "rolled_back"
    state = SagaState.load(rec.data)
    assert (state.code, state.failed_step) == ("vm_migration_failed", "migrate_vm")
    assert [c for c in h.port.calls if c[2] == "CleanupSource"] == ROLLBACK_SOURCE
    assert not h.port.sent("FreezeEvents") and not h.port.sent("FinishIncoming") and not h.port.sent("MigrationComplete")


async def test_a_lost_reply_is_asked_again_per_the_policy() -> None:
    h = harness({"FreezeEvents": [raises(TimedOut("no answer")), lambda c: EventsFrozen(queued=2)]})
    rec = await h.run()
    assert rec.status == "completed"
    assert len(h.port.sent("FreezeEvents")) == 2
    retries = [h for h in rec.history if h.event == "retry"]
    assert [(r.step, r.detail["service"], r.detail["attempt"]) for r in retries] == [("freeze_events", "sensor", 1)]
    assert h.clock.slept.count(0.05) >= 1  # the policy's first back-off
    assert SagaState.load(rec.data).queued_at_freeze == 2


async def test_a_reply_lost_more_often_than_the_policy_allows_rolls_back() -> None:
    h = harness({"FreezeEvents": raises(TimedOut("no answer"))})
    rec = await h.run(timeouts=SagaTimeouts(attempts=3, progress_interval_s=0.0))
    assert rec.status == "rolled_back"
    assert len(h.port.sent("FreezeEvents")) == 3
    assert SagaState.load(rec.data).code == "timeout"


async def test_past_the_point_of_no_return_a_failure_is_retried_forward_never_compensated() -> None:
    fail = raises(FailedOnHost("sensor busy", code="internal"))
    h = harness({"MigrationComplete@sensor": [fail, fail, lambda c: MigrationCompleteAck(dispatched=7)]})
    rec = await h.run(timeouts=SagaTimeouts(forward_retry_s=0.5, forward_retry_max_s=10.0, progress_interval_s=0.0))
    assert rec.status == "completed"
    state = SagaState.load(rec.data)
    assert state.retries == {"complete": 2} and state.events_dispatched_on_target == 7
    assert not h.port.sent("CleanupTarget") and not h.port.sent("CleanupSource")
    assert [(h.step, h.detail["attempt"]) for h in rec.history if h.event == "retry"] == [("complete", 1), ("complete", 2)]
    assert [d for d in h.clock.slept if d >= 0.5] == [0.5, 1.0]  # the forward policy's exponential waits
    assert [s.status for s in h.statuses if s.status != "progress"] == ["completed"]


async def test_a_cancel_before_the_switch_rolls_back() -> None:
    h = harness()
    h.cancels[MID] = "operator says no"
    rec = await h.run()
    assert rec.status == "rolled_back"
    assert (SagaState.load(rec.data).code, SagaState.load(rec.data).reason) == ("cancelled", "operator says no")
    assert not h.port.sent("StartMigration")
