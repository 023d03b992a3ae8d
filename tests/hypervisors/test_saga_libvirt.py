"""The full migration saga over the real RabbitMQ with the libvirt driver on both hosts.

Each host's adapter talks to its own libvirt daemon (``scripts/libvirt-daemons.sh``); the
source daemon migrates peer-to-peer to the target daemon. A completed p2p migration ends the
source domain, so once libvirt reports completion the saga can only go forward.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ferry_common.errors import FerryError
from ferry_common.messages.commands import FinishIncoming
from tests.harness import Cluster

from .conftest import _libvirt_qemu_pid
from .saga_support import (
    DIRTY_GUEST,
    Guest,
    RollbackSuite,
    assert_completed,
    host_options,
    saga_cluster,
    start_guest,
)

pytestmark = [pytest.mark.libvirt, pytest.mark.rabbitmq]


@pytest.fixture
async def cluster(
    guest_image: Path, libvirt_daemons: dict[str, str], rabbitmq_available: None
) -> AsyncIterator[Cluster]:
    base = Path(tempfile.mkdtemp(prefix="fsl-", dir="/tmp"))
    opts = host_options(
        "libvirt",
        {
            "host-a": {"uri": libvirt_daemons["a"], "run_dir": str(base / "a"), "guest_image": str(guest_image)},
            "host-b": {"uri": libvirt_daemons["b"], "run_dir": str(base / "b"), "guest_image": str(guest_image)},
        },
    )
    async with saga_cluster(opts) as c:
        yield c
    shutil.rmtree(base, ignore_errors=True)


def source_gone(g: Guest) -> Any:
    async def gone() -> bool:
        # peer-to-peer: libvirt removed the source domain in its Confirm phase
        return bool(await g.driver("host-a").state(g.vm_id) == "absent")

    return gone


async def test_completed_saga_moves_dirtying_guest_plane_and_events(cluster: Cluster) -> None:
    g = await start_guest(cluster, DIRTY_GUEST)
    await asyncio.sleep(0.5)
    g.start_stream()
    mid = await cluster.client.migrate(g.vm_id, "host-b")
    outcome = await cluster.client.outcome(mid, timeout=60)
    await g.stop_stream()
    await assert_completed(cluster, g, mid, outcome, source_gone(g))


class TestRollbacks(RollbackSuite):
    def target_pid(self, g: Guest) -> int | None:
        return _libvirt_qemu_pid("b", g.vm_id)


async def test_failure_after_p2p_completion_goes_forward(cluster: Cluster) -> None:
    """After libvirt completed, the source domain is gone: a failing FinishIncoming must not
    roll back (that would leave the guest nowhere) but be retried until the saga completes."""
    g = await start_guest(cluster, DIRTY_GUEST)
    adapter = cluster.host("host-b").adapter
    model, real = adapter.router.handlers["FinishIncoming"]
    calls: list[str] = []

    async def fail_once(msg: FinishIncoming, ctx: Any) -> Any:
        calls.append(await g.driver("host-a").state(msg.vm_id))
        if len(calls) == 1:
            raise FerryError("injected: FinishIncoming failed once", code="injected_failure")
        return await real(msg, ctx)

    adapter.router.handlers["FinishIncoming"] = (model, fail_once)
    g.start_stream(every_s=0.05)
    mid = await cluster.client.migrate(g.vm_id, "host-b")
    outcome = await cluster.client.outcome(mid, timeout=60)
    await g.stop_stream()
    assert calls[0] == "absent" and len(calls) >= 2, calls
    await assert_completed(cluster, g, mid, outcome, source_gone(g))
    rec = await cluster.store.get(mid)
    assert rec is not None and rec.data["retries"]["switch_over"] >= 1
