"""The plan's declaration holds together: what it names exists, in an order that can run."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

from ferry_common.errors import FailedOnHost, ProtocolError
from ferry_common.messages.commands import (
    HOST_SERVICES,
    Done,
    FinishIncoming,
    MigrationComplete,
    StartMigration,
)
from ferry_common.messages.registry import REGISTRY
from ferry_coordinator.saga import STEPS, build_plan
from ferry_coordinator.saga.port import check_reply, service_of
from ferry_coordinator.timeouts import SagaTimeouts

PLAN = build_plan(SagaTimeouts())
SAGA = pathlib.Path(__file__).parents[2] / "services/coordinator/ferry_coordinator/saga"


def test_steps_are_named_once_in_run_order() -> None:
    assert STEPS == PLAN.names and len(set(STEPS)) == len(STEPS)
    assert STEPS[0] == "admission" and STEPS[-1] == "teardown"
    assert [PLAN.after(a) for a in STEPS] == [*STEPS[1:], None]


@pytest.mark.parametrize("step", STEPS)
def test_every_command_names_host_services_and_registered_replies(step: str) -> None:
    spec = PLAN[step]
    assert spec.sends, f"{step} sends nothing"
    for command in spec.sends:
        assert command.services and set(command.services) <= set(HOST_SERVICES), command.__name__
        assert command.replies, f"{command.__name__} accepts no reply"
        for reply in command.replies:
            assert REGISTRY.get(reply.__name__) is reply, f"{reply.__name__} is not a registered message"
        assert REGISTRY.get(command.__name__) is command


def test_early_work_is_joined_by_a_later_step() -> None:
    started = [(s.name, s.starts) for s in PLAN.steps if s.starts is not None]
    assert {e.handle for _, e in started} == {"launch", "switch", "teardown"}
    for name, early in started:
        assert STEPS.index(early.joined_at) > STEPS.index(name), early


def test_only_steps_after_the_switch_over_are_forward_only() -> None:
    forward = [s.name for s in PLAN.steps if s.forward_only]
    assert forward and all(STEPS.index(n) > STEPS.index("switch_over") for n in forward)
    assert PLAN.forward.attempts is None and PLAN.cleanup.attempts is None


def test_timeouts_and_retries_come_from_the_settings() -> None:
    t = SagaTimeouts(reply_s=3.0, attempts=4, forward_retry_s=0.2, forward_retry_max_s=2.0)
    plan = build_plan(t)
    assert {s.reply_s for s in plan.steps} == {3.0} and {s.retry.attempts for s in plan.steps} == {4}
    assert (plan.forward.backoff_s, plan.forward.max_s, plan.forward.growth) == (0.2, 2.0, "exponential")
    assert plan["migrate_vm"].limit_s == t.vm_migration_s


def test_a_command_builds_its_route_and_refuses_foreign_replies() -> None:
    start = StartMigration.model_validate({"migration_id": "m", "vm_id": "v", "source_host": "a", "target_host": "b",
                                           "vm": {"vm_id": "v", "memory_mib": 256}})
    assert service_of(start, None) == "migration_policy"
    with pytest.raises(ProtocolError):
        check_reply(start, Done(), "migration_policy on b")
    complete = MigrationComplete(migration_id="m", vm_id="v")
    with pytest.raises(ProtocolError):
        service_of(complete, None)  # it goes to two services: the call must say which
    assert service_of(complete, "sensor") == "sensor"
    assert check_reply(FinishIncoming(migration_id="m", vm_id="v"), Done(), "x") == Done()
    assert not FailedOnHost("x", code="y").retryable and FailedOnHost("x", code="y", retryable=True).retryable


def test_the_saga_names_steps_not_the_seed_numbers() -> None:
    numbered = re.compile(r"\bsteps? [1-8][ab]?\b|\b[1-8][ab]\b", re.IGNORECASE)
    for path in SAGA.glob("*.py"):
        text = path.read_text()
        ast.parse(text)
        assert not numbered.findall(text), f"{path.name}: {numbered.findall(text)}"


def test_the_plan_reads_as_a_table() -> None:
    from ferry_coordinator.saga.plan import describe

    text = describe(PLAN)
    assert [line.split(":")[0] for line in text.splitlines() if not line.startswith(" ")][:-1] == list(STEPS)
    assert "StartMigration -> migration_policy: MigrationPermitted | MigrationDenied" in text
    assert "starts launch" in text and "joined at migrate_vm" in text
