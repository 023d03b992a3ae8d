"""Network faults between one service process and RabbitMQ (its own proxy): connections cut
(robust reconnect, redeliveries, lost replies), traffic stalled past the saga's reply timeout
(delayed messages, late answers), a frozen process (SIGSTOP) and a service down for longer
than the saga waits (timeouts): every migration ends completed or rolled back."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import pytest

from ferry_coordinator.saga import STEPS
from tests.faults.cases import migration_case
from tests.faults.procs import ProcCluster, Session

pytestmark = pytest.mark.rabbitmq
SOAK = os.environ.get("FERRY_SOAK") == "1"
ALL_VICTIMS = ("coordinator", *(f"{r}/{s}" for r in ("source", "target")
                                for s in ("sensor", "managed_object", "migration_policy", "hypervisor_adapter")))
CI = {
    "cut": [("coordinator", "migrate_vm"), ("target/managed_object", "management_state"),
            ("source/sensor", "event_state"), ("target/sensor", "complete")],
    "stall 3s": [("coordinator", "event_state"), ("target/managed_object", "management_state")],
    "stall replies 3s": [("target/sensor", "event_state")],
    "sigstop 5s": [("target/managed_object", "management_state"), ("source/sensor", "freeze_events"),
                   ("target/hypervisor_adapter", "freeze_events")],  # FinishIncoming is sent then
    "down 6s": [("target/managed_object", "management_state"), ("target/hypervisor_adapter", "migrate_vm"),
                ("target/managed_object", "complete")],
}
SOAK_STEPS = STEPS


def _matrix() -> list[tuple[str, str, str]]:
    if SOAK:
        return [(k, v, s) for k in CI for v in ALL_VICTIMS for s in SOAK_STEPS]
    return [(k, v, s) for k, cases in CI.items() for v, s in cases]


@pytest.fixture
async def sess(procs: ProcCluster) -> AsyncIterator[Session]:
    s = await Session.open(procs.vhost)
    yield s
    await s.close()


def _name(victim: str, source: str, target: str) -> str:
    if victim == "coordinator":
        return victim
    role, svc = victim.split("/")
    return f"{source if role == 'source' else target}/{svc}"


@pytest.mark.parametrize(("fault", "victim", "step"), _matrix())
async def test_network_fault(procs: ProcCluster, sess: Session, fault: str, victim: str, step: str) -> None:
    async def inject(source: str, target: str, mid: str) -> str:
        name = _name(victim, source, target)
        if fault == "cut":
            procs.proxies.cut(name)
        elif fault == "stall 3s":
            await procs.proxies.stall(name, 3.0)
        elif fault == "stall replies 3s":
            await procs.proxies.stall(name, 3.0, "up")  # its answers and acks wait
        elif fault == "sigstop 5s":
            procs.signal(name, signal.SIGSTOP)
            await asyncio.sleep(5.0)
            procs.signal(name, signal.SIGCONT)
        elif fault == "down 6s":
            procs.kill(name, signal.SIGTERM)
            await asyncio.sleep(6.0)
            await procs.restart(name)
        return name

    case = await migration_case(procs, sess, f"{fault} {victim}", step, inject, timeout=60)
    assert not case.violations, case
