"""The full migration saga over the real RabbitMQ with the QEMU driver on both hosts.

The coordinator and two hosts run in this process; each host's adapter drives its own QEMU
processes (separate run directories), so the guest really moves between two QEMU processes
while its management plane moves between the two hosts' services and events keep arriving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ferry_common.errors import FerryError
from ferry_common.messages.commands import FinishIncoming
from ferry_hypervisor_adapter.drivers.qemu import _process_alive, _read_pid
from tests.harness import Cluster, until

from .conftest import require_qemu, short_dir
from .saga_support import (
    DIRTY_GUEST,
    Guest,
    RollbackSuite,
    assert_completed,
    assert_rolled_back,
    host_options,
    require,
    saga_cluster,
    start_guest,
)

pytestmark = [pytest.mark.qemu, pytest.mark.rabbitmq]


@pytest.fixture
async def cluster(guest_image: Path, rabbitmq_available: None) -> AsyncIterator[Cluster]:
    require_qemu()
    base = short_dir("fs-")
    opts = host_options(
        "qemu",
        {
            "host-a": {"run_dir": str(base / "a"), "guest_image": str(guest_image)},
            # the target keeps a receiving QEMU of the guests' shape ready: every saga here
            # lands in one (and a rollback kills the one it took)
            "host-b": {"run_dir": str(base / "b"), "guest_image": str(guest_image), "standby": "128:2"},
        },
    )
    async with saga_cluster(opts) as c:
        yield c
    shutil.rmtree(base, ignore_errors=True)


async def _standby_announced(cluster: Cluster, vm_id: str) -> str:
    """The name of host-b's ready standby, once the coordinator has seen it in an inventory
    (a saga then takes it beside its admission)."""
    target = cluster.host("host-b").adapter.driver
    located = cluster.coordinator.hosts.locate(vm_id)
    assert located is not None

    async def announced() -> bool:
        return bool(target.standby.names()) and cluster.coordinator.hosts.ready_for("host-b", located[1])

    await until(announced, 10, "host-b's standby in its inventory")
    (standby,) = target.standby.names()
    return str(standby)


async def test_completed_saga_moves_dirtying_guest_plane_and_events(cluster: Cluster) -> None:
    g = await start_guest(cluster, DIRTY_GUEST)
    await asyncio.sleep(0.5)  # the guest has written its whole region once
    target = g.driver("host-b")
    standby = await _standby_announced(cluster, g.vm_id)
    standby_pid = _read_pid(target.run_dir / ".standby" / standby)
    g.start_stream()
    mid = await cluster.client.migrate(g.vm_id, "host-b")
    outcome = await cluster.client.outcome(mid, timeout=60)
    await g.stop_stream()
    assert standby_pid is not None and target.pid(g.vm_id) == standby_pid  # landed in the standby

    async def source_gone() -> bool:
        # the source QEMU sat in postmigrate (vCPU stopped) until teardown quit it
        return bool(await g.driver("host-a").state(g.vm_id) == "absent")

    await assert_completed(cluster, g, mid, outcome, source_gone)
    rec = await cluster.store.get(mid)
    assert rec is not None and rec.data["events_dispatched_on_target"] >= 0
    assert rec.data["target_ready"] is True  # taken beside the admission


async def test_a_denied_migration_gives_back_the_receiving_process_it_took(guest_image: Path, rabbitmq_available: None) -> None:
    """The saga takes host-b's ready standby beside asking host-b's policy, which refuses
    host-a as a source: the migration is rejected, the standby it took is gone with nothing
    left of the VM on host-b, and the guest runs on at host-a."""
    require("qemu-system-x86_64", shutil.which("qemu-system-x86_64") is not None)
    base = short_dir("fs-")
    opts = host_options(
        "qemu",
        {
            "host-a": {"run_dir": str(base / "a"), "guest_image": str(guest_image)},
            "host-b": {"run_dir": str(base / "b"), "guest_image": str(guest_image), "standby": "128:2"},
        },
    )
    opts["host-b"] = dataclasses.replace(opts["host-b"], allowed_sources=("host-c",))
    async with saga_cluster(opts) as c:
        g = await start_guest(c, {})
        target = g.driver("host-b")
        standby = await _standby_announced(c, g.vm_id)
        standby_pid = _read_pid(target.run_dir / ".standby" / standby)
        assert standby_pid is not None

        mid = await c.client.migrate(g.vm_id, "host-b")
        outcome = await c.client.outcome(mid, timeout=60)

        assert outcome.status == "rejected" and outcome.code == "source_not_allowed", outcome
        rec = await c.store.get(mid)
        assert rec is not None and rec.data["target_ready"] is True
        assert not _process_alive(standby_pid), "the standby taken for the denied migration still runs"
        assert await target.state(g.vm_id) == "absent"
        assert c.host("host-b").adapter.incoming == {}
        assert await g.driver("host-a").state(g.vm_id) == "running"
        assert await g.advancing("host-a")
    shutil.rmtree(base, ignore_errors=True)


class TestRollbacks(RollbackSuite):
    def target_pid(self, g: Guest) -> int | None:
        return g.driver("host-b").pid(g.vm_id)  # type: ignore[no-any-return]


async def test_failure_after_hypervisor_completed_destroys_target_and_resumes_source(cluster: Cluster) -> None:
    """The race: QEMU finished (source postmigrate, target running and even adopted by
    FinishIncoming), then the saga fails and rolls back: the target copy must go and the
    source resume, never both running and never neither."""
    g = await start_guest(cluster, DIRTY_GUEST)
    adapter = cluster.host("host-b").adapter
    model, real = adapter.router.handlers["FinishIncoming"]
    seen: dict[str, Any] = {}

    async def finish_then_fail(msg: FinishIncoming, ctx: Any) -> Any:
        await real(msg, ctx)  # the guest runs here now, adopted as a guest of host-b
        seen["target"] = await adapter.driver.state(msg.vm_id)
        seen["source"] = await g.driver("host-a").state(msg.vm_id)
        raise FerryError("injected: the reply never made it", code="injected_failure")

    adapter.router.handlers["FinishIncoming"] = (model, finish_then_fail)
    g.start_stream(every_s=0.05)
    mid = await cluster.client.migrate(g.vm_id, "host-b")
    outcome = await cluster.client.outcome(mid, timeout=60)
    await g.stop_stream()
    assert seen == {"target": "running", "source": "postmigrate"}, seen
    await assert_rolled_back(cluster, g, outcome, code="injected_failure")
