"""SIGKILL of every service on either host and of the coordinator, at every saga step, then a
restart on the same state: every migration ends completed or rolled back, with every invariant."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest

from ferry_coordinator.saga import STEPS
from tests.faults.cases import migration_case
from tests.faults.procs import SERVICES, ProcCluster, Session

pytestmark = pytest.mark.rabbitmq
SOAK = os.environ.get("FERRY_SOAK") == "1"
ROUNDS = int(os.environ.get("FERRY_SOAK_ROUNDS", "2")) if SOAK else 1

# in CI each host service dies at the steps where the saga talks to it; soak: at every step
INVOLVED = {
    ("source", "sensor"): ("freeze_events", "event_state"),
    ("source", "managed_object"): ("management_state", "event_state"),
    ("source", "migration_policy"): ("migrate_vm",),
    # the source's teardown is sent when step 7 begins: killed then, it is in flight
    ("source", "hypervisor_adapter"): ("migrate_vm", "complete"),
    ("target", "sensor"): ("event_state", "complete"),
    ("target", "managed_object"): ("management_state", "complete"),
    ("target", "migration_policy"): ("admission", "complete"),
    # FinishIncoming goes when step 2 begins (step 6b takes its answer): killed then, it is in flight
    ("target", "hypervisor_adapter"): ("migrate_vm", "freeze_events"),
}


def _matrix() -> list[tuple[str, str]]:
    out = [("coordinator", s) for s in STEPS]
    for (role, svc), steps in INVOLVED.items():
        out += [(f"{role}/{svc}", s) for s in (STEPS if SOAK else steps)]
    return [c for c in out for _ in range(ROUNDS)]


@pytest.fixture
async def sess(procs: ProcCluster) -> AsyncIterator[Session]:
    s = await Session.open(procs.vhost)
    yield s
    await s.close()


@pytest.mark.parametrize(("victim", "step"), _matrix())
async def test_kill_at_step(procs: ProcCluster, sess: Session, victim: str, step: str) -> None:
    async def inject(source: str, target: str, mid: str) -> str:
        if victim == "coordinator":
            name = "coordinator"
        else:
            role, svc = victim.split("/")
            name = f"{source if role == 'source' else target}/{svc}"
        procs.kill(name)
        await asyncio.sleep(0.2)
        await procs.restart(name)
        return name

    case = await migration_case(procs, sess, f"kill {victim}", step, inject)
    assert not case.violations, case
    assert case.outcome in ("completed", "rolled_back")


def test_services_listed() -> None:
    assert {s for _, s in INVOLVED} == set(SERVICES)
