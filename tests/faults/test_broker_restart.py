"""RabbitMQ restarted (``rabbitmqctl stop_app`` / ``start_app``) in mid-saga: quorum queues and
persistent messages keep every command and event, robust connections restore every consumer,
and every migration still ends completed or rolled back. The whole broker goes down, so these
run last, are few, and always leave the broker running."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator

import pytest

from tests.faults.cases import migration_case
from tests.faults.conftest import ensure_broker
from tests.faults.procs import ProcCluster, Session
from tests.harness import rabbitmqctl

pytestmark = [pytest.mark.rabbitmq, pytest.mark.broker_restart]
SOAK = os.environ.get("FERRY_SOAK") == "1"
STEPS = (["management_state", "migrate_vm", "freeze_events", "event_state", "complete", "teardown"] if SOAK
         else ["event_state", "migrate_vm"])


@pytest.fixture
async def sess(procs: ProcCluster) -> AsyncIterator[Session]:
    s = await Session.open(procs.vhost)
    yield s
    await s.close()


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(rabbitmqctl(*args), check=True, capture_output=True, timeout=120)


@pytest.mark.parametrize("step", STEPS)
async def test_broker_restart_at_step(procs: ProcCluster, sess: Session, step: str) -> None:
    async def inject(source: str, target: str, mid: str) -> str:
        try:
            await asyncio.to_thread(_rabbitmqctl, "stop_app")
            await asyncio.sleep(2.0)
        finally:
            await asyncio.to_thread(_rabbitmqctl, "start_app")
            await asyncio.to_thread(ensure_broker)
        # every process reconnects on its own (robust connection); wait until all say ready
        await asyncio.to_thread(procs.wait_ready, None, 60.0)
        return "stop_app 2s"

    try:
        case = await migration_case(procs, sess, "broker restart", step, inject, timeout=90)
    finally:
        await asyncio.to_thread(ensure_broker)
    assert not case.violations, case
