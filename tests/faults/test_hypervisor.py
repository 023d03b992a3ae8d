"""Hypervisor failures (the sim driver's ``sim_fail``) on real processes, alone and with the
coordinator killed during the clean-up: the migration rolls back and the VM keeps running
on its source with its plane and events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.faults.cases import migration_case
from tests.faults.procs import ProcCluster, Session

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
async def sess(procs: ProcCluster) -> AsyncIterator[Session]:
    s = await Session.open(procs.vhost)
    yield s
    await s.close()


# the step whose request fails: FinishIncoming goes out when step 2 begins (6b takes its answer)
@pytest.mark.parametrize(("fail", "step"), [("migrate", "migrate_vm"), ("incoming", "migrate_vm"),
                                            ("finish", "freeze_events")])
async def test_hypervisor_failure(procs: ProcCluster, sess: Session, fail: str, step: str) -> None:
    async def nothing(source: str, target: str, mid: str) -> None:
        return None

    case = await migration_case(procs, sess, f"sim_fail={fail}", step, nothing, vm_params={"sim_fail": fail},
                                expect="rolled_back")
    assert not case.violations, case


@pytest.mark.parametrize("victim", ["coordinator", "source/sensor", "target/managed_object"])
async def test_kill_during_compensation(procs: ProcCluster, sess: Session, victim: str) -> None:
    async def inject(source: str, target: str, mid: str) -> str:
        role, _, svc = victim.partition("/")
        name = victim if not svc else f"{source if role == 'source' else target}/{svc}"
        procs.kill(name)
        await asyncio.sleep(0.2)
        await procs.restart(name)
        return name

    case = await migration_case(procs, sess, f"sim_fail=migrate + kill {victim}", "compensate", inject,
                                vm_params={"sim_fail": "migrate"}, expect="rolled_back")
    assert not case.violations, case
