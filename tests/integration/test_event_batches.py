"""Events sent in batches (``VmEventBatch``) act exactly as the same events sent one by one:
once each, in time order, on whichever host the VM ends on; on both buses."""

from __future__ import annotations

import asyncio

import pytest

from ferry_common.bus.interfaces import Message
from ferry_common.bus.topology import vm_events
from ferry_common.messages.domain import Event
from ferry_testing.sample import event
from tests.harness import Cluster, make_cluster, until


@pytest.fixture
async def cluster(bus_kind: str):
    c = await make_cluster(bus_kind)
    yield c
    await c.close()


async def test_batched_events_are_dispatched_once_in_order(cluster: Cluster) -> None:
    await cluster.create_vm("host-a", "vm1")
    sent = await cluster.send_batches("vm1", 250, size=100)
    await cluster.settle("vm1")
    ledger = cluster.host("host-a").managed_object.ledger["vm1"]
    assert ledger == [e.id for e in sent]
    state = cluster.host("host-a").managed_object.planes["vm1"].state["vm1.load"]
    assert state["high_samples"] == sum(1 for e in sent if e.kind == "cpu.load" and e.data["value"] > 0.8)


async def test_a_batch_repeating_events_acts_on_each_once(cluster: Cluster) -> None:
    await cluster.create_vm("host-a", "vm1")
    first = await cluster.send_batches("vm1", 10, size=10)
    await cluster.settle("vm1")
    # a collector that retries: the same events again, in a batch and alone, and twice in one batch
    await cluster.client.send_batch("vm1", [*first[5:], *first[5:]])
    more = await cluster.send_events("vm1", 3)
    await cluster.settle("vm1")
    assert cluster.host("host-a").managed_object.ledger["vm1"] == [e.id for e in first + more]
    assert cluster.host("host-a").sensor.duplicates == 10


async def test_batches_sent_while_the_vm_migrates_end_on_the_target_once_in_order(cluster: Cluster) -> None:
    await cluster.create_vm("host-a", "vm1", memory_mib=512, sim_bandwidth_mibps=1024)  # ~0.5 s
    await cluster.send_batches("vm1", 20, size=10)
    before = len(cluster.sent["vm1"])
    mid = await cluster.client.migrate("vm1", "host-b")
    outcome_task = asyncio.create_task(cluster.client.outcome(mid, timeout=30))
    while not outcome_task.done():  # from the request until the outcome, and a little after
        await cluster.send_batches("vm1", 20, size=7)
        await asyncio.sleep(0.05)
    await cluster.send_batches("vm1", 20, size=7)
    outcome = await outcome_task
    assert outcome.status == "completed", outcome
    await cluster.settle("vm1")
    ids = [e.id for e in cluster.sent["vm1"]]
    dispatched = [i for h in cluster.hosts.values() for i in h.managed_object.ledger.get("vm1", [])]
    assert sorted(dispatched) == sorted(ids)  # each exactly once, on one host or the other
    on_source = cluster.host("host-a").managed_object.ledger["vm1"]
    on_target = cluster.host("host-b").managed_object.ledger["vm1"]
    ts = {e.id: e.ts for e in cluster.sent["vm1"]}
    # the source acted on events while the VM pre-copied; the target took over the rest
    assert len(on_source) > before and len(on_target) >= 20
    assert [ts[i] for i in on_target] == sorted(ts[i] for i in on_target)
    assert "vm1" not in cluster.host("host-a").sensor.vms


async def test_a_batch_mixing_vms_is_dead_lettered_and_the_sensor_goes_on(cluster: Cluster) -> None:
    await cluster.create_vm("host-a", "vm1")
    sensor = cluster.host("host-a").sensor
    before = sensor.endpoint.stats["dead_lettered"]
    stray = [event("vm1", 0, 1.0), event("vm2", 1, 2.0)]
    body = b'{"vm_id":"vm1","events":[' + b",".join(e.model_dump_json().encode() for e in stray) + b"]}"
    await cluster.client.endpoint.bus.publish(Message(routing_key=vm_events("vm1"), body=body, type="VmEventBatch"))

    async def refused() -> bool:
        return sensor.endpoint.stats["dead_lettered"] > before
    await until(refused, 10.0, "the mixed batch to be dead-lettered")
    assert not cluster.host("host-a").managed_object.ledger.get("vm1")  # nothing of it acted
    good = await cluster.send_batches("vm1", 5, size=5)
    await cluster.settle("vm1")
    assert cluster.host("host-a").managed_object.ledger["vm1"] == [e.id for e in good]


def test_a_batch_names_one_vm() -> None:
    from pydantic import ValidationError

    from ferry_common.messages.public import VmEventBatch
    with pytest.raises(ValidationError, match="not 'vm1'"):
        VmEventBatch(vm_id="vm1", events=[Event(id="e", vm_id="vm2", element_id="vm2", kind="k", ts=1.0)])
    with pytest.raises(ValidationError):
        VmEventBatch(vm_id="vm1", events=[])
