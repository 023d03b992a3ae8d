"""The saga over the real RabbitMQ with QEMU or libvirt on both hosts, for a guest that pre-copy cannot
move: up the downtime ladder, then aborted (its policy forbids post-copy: it keeps running on
the source with its plane) or finished in post-copy (it runs on the target, the record says
when post-copy started)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ferry_common.messages.public import MigrationStatusEvent
from tests.harness import Cluster, inspect_problems

from .conftest import require_qemu
from .saga_support import (
    STUCK_GUEST,
    Guest,
    assert_rolled_back,
    host_options,
    progress_events,
    saga_cluster,
    start_guest,
)

# a 64 MiB region rewritten flat out never fits in 150 ms at 32 MiB/s: two rungs, then the policy
LADDER: dict[str, Any] = {
    "bandwidth_mibps": 32,
    "downtime_limit_ms": 100,
    "downtime_ladder_ms": [150],
    "stall_passes": 2,
    "stall_timeout_s": 2.0,
    "completion_timeout_min_s": 120,
}


@pytest.fixture(params=[pytest.param("qemu", marks=[pytest.mark.qemu, pytest.mark.rabbitmq]),
                        pytest.param("libvirt", marks=[pytest.mark.libvirt, pytest.mark.rabbitmq])])
async def cluster(request: pytest.FixtureRequest, guest_image: Path, rabbitmq_available: None) -> AsyncIterator[Cluster]:
    base = Path(tempfile.mkdtemp(prefix="fc-", dir="/tmp"))  # short: QMP socket paths
    a: dict[str, Any] = {"run_dir": str(base / "a"), "guest_image": str(guest_image)}
    b: dict[str, Any] = {"run_dir": str(base / "b"), "guest_image": str(guest_image)}
    if request.param == "qemu":
        require_qemu()
        # a receiving process started before the VM's policy was known takes post-copy too
        b["standby"] = "128:2"
    else:
        daemons = request.getfixturevalue("libvirt_daemons")
        a["uri"], b["uri"] = daemons["a"], daemons["b"]
    async with saga_cluster(host_options(str(request.param), {"host-a": a, "host-b": b})) as c:
        yield c
    shutil.rmtree(base, ignore_errors=True)


async def _migrate_stuck_guest(cluster: Cluster, postcopy: str) -> tuple[Guest, str, MigrationStatusEvent]:
    """A guest pre-copy cannot move, whose own policy says ``postcopy``, migrated up the ladder
    while events stream to its plane."""
    g = await start_guest(cluster, {**STUCK_GUEST, "migration": {"postcopy": postcopy}})
    g.start_stream(every_s=0.05)
    mid = await cluster.client.migrate(g.vm_id, "host-b", params=LADDER)
    outcome = await cluster.client.outcome(mid, timeout=90)
    await g.stop_stream()
    return g, mid, outcome


async def test_a_guest_whose_policy_forbids_postcopy_is_rolled_back_with_its_plane(cluster: Cluster) -> None:
    g, mid, outcome = await _migrate_stuck_guest(cluster, "forbid")

    await assert_rolled_back(cluster, g, outcome, "vm_migration_failed")
    assert "forbids post-copy" in (outcome.reason or ""), outcome
    assert max(p["rung"] for p in progress_events(cluster, mid)) == 1  # it climbed before giving up
    rec = await cluster.store.get(mid)
    assert rec is not None and not rec.data.get("postcopy_started")


async def test_a_guest_that_never_converges_completes_in_postcopy(cluster: Cluster) -> None:
    # the VM's own policy allows post-copy; the request only sets the ladder
    g, mid, outcome = await _migrate_stuck_guest(cluster, "allow")

    assert outcome.status == "completed", outcome
    assert await g.advancing("host-b"), "guest does not run on the target"
    assert await g.driver("host-a").state(g.vm_id) == "absent", "the source still holds the guest"
    await cluster.send_events(g.vm_id, 10)
    assert await inspect_problems(cluster, g.vm_id, "host-b") == []  # the plane runs there, events intact
    rec = await cluster.store.get(mid)
    assert rec is not None and rec.status == "completed" and rec.data["postcopy_started"] is True
    # libvirt keeps no record of a post-copy job's downtime on the target (its source is gone)
    assert rec.data["vm_stats"]["transferred_bytes"] > 64 * 1024 * 1024, rec.data["vm_stats"]
    events = [(h.step, h.event) for h in rec.history]
    assert events.index(("migrate_vm", "postcopy_started")) < events.index(("migrate_vm", "succeeded"))
    assert any(p["postcopy"] for p in progress_events(cluster, mid))
    assert await g.advancing("host-b"), "the guest's counter does not advance on the target"
