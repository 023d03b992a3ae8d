"""Every outcome of the saga, on the in-process bus and on the real RabbitMQ, with the
final state checked on every host."""

from __future__ import annotations

import pytest

from tests.harness import Cluster, check_invariants, make_cluster


def high_samples(c: Cluster, vm_id: str) -> int:
    return sum(1 for e in c.sent[vm_id] if e.kind == "cpu.load" and e.data["value"] > 0.8)


@pytest.fixture
async def cluster(bus_kind: str):
    c = await make_cluster(bus_kind)
    yield c
    await c.close()


async def test_completed_migration_moves_plane_state_and_events(cluster: Cluster) -> None:
    await cluster.create_vm("host-a", "vm1")
    await cluster.send_events("vm1", 12)
    await cluster.settle("vm1")
    before = cluster.host("host-a").managed_object.planes["vm1"].state["vm1.load"]
    assert before["high_samples"] == high_samples(cluster, "vm1") == 3
    outcome = await cluster.migrate("vm1", "host-b")
    assert outcome.status == "completed", outcome
    await cluster.send_events("vm1", 6)
    await check_invariants(cluster, "vm1", "host-b")
    after = cluster.host("host-b").managed_object.planes["vm1"].state["vm1.load"]
    # the policy's counter carried on where it stopped on the source
    assert after["high_samples"] == high_samples(cluster, "vm1") == 5
    assert "sustained-load" in after["alarms"]
