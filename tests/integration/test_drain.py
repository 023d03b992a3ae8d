"""A backlog goes to the managed-object service a chunk at a time, each chunk answered before
the next; when a chunk is not answered, what was already acted on is not sent again (a resend
could come after the dedup window moved past it) and the rest goes on the next try."""

from __future__ import annotations

from typing import Any

import pytest

from ferry_common.errors import StepTimeout
from ferry_common.messages.commands import DispatchEvents
from ferry_managed_object import plane as plane_module
from ferry_sensor import dispatch as sensor_module
from tests.harness import Cluster, make_cluster, until


@pytest.fixture
async def cluster(bus_kind: str):
    c = await make_cluster(bus_kind)
    yield c
    await c.close()


async def hold_backlog(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """vm1 on host-a with 45 events held by its sensor (no lease), drained in chunks of 10 into a
    managed object whose dedup window keeps only 6 to 8 ids; renewals only when a test says."""
    monkeypatch.setattr(sensor_module, "DISPATCH_BATCH", 10)
    monkeypatch.setattr(plane_module, "RECENT_IDS", 2)
    await cluster.create_vm("host-a", "vm1")
    sensor = cluster.host("host-a").sensor
    sensor._lease_loop.cancel()  # type: ignore[union-attr]
    monkeypatch.setattr(sensor, "renew_soon", lambda: None)
    if sensor._renewing is not None:
        await sensor._renewing
    sensor.leases.surrender("vm1")  # no lease: what arrives is held, to be drained later
    await cluster.send_events("vm1", 45)

    async def held() -> bool:
        return sensor.vms["vm1"].queued == 45
    await until(held, 10, "45 events held")


def fail_third_chunk(sensor: Any, monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> list[int]:
    """Raise ``exc`` instead of sending the third drain chunk; returns the chunk sizes asked for."""
    real = sensor.endpoint.request
    chunks: list[int] = []

    async def request(key: str, msg: Any, **kw: Any) -> Any:
        if isinstance(msg, DispatchEvents):
            chunks.append(len(msg.events))
            if len(chunks) == 3:
                raise exc
        return await real(key, msg, **kw)

    monkeypatch.setattr(sensor.endpoint, "request", request)
    return chunks


async def test_a_drain_that_fails_midway_resends_only_what_did_not_get_out(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    await hold_backlog(cluster, monkeypatch)
    sensor = cluster.host("host-a").sensor
    mo = cluster.host("host-a").managed_object
    chunks = fail_third_chunk(sensor, monkeypatch, StepTimeout("chunk not answered (test)"))
    await sensor.renew()  # granted: the drain sends two chunks, the third is not answered
    assert chunks == [10, 10, 10] and sensor.vms["vm1"].queued == 25
    assert mo.dispatched_count("vm1") == 20
    await sensor.renew()  # the next try sends what is still held, and only that
    assert chunks[3:] == [10, 10, 5] and sensor.vms["vm1"].queued == 0
    await cluster.settle("vm1")
    assert mo.ledger["vm1"] == [e.id for e in cluster.sent["vm1"]]
    state = mo.planes["vm1"].state["vm1.load"]
    assert state["seen"] == sum(1 for e in cluster.sent["vm1"] if e.element_id == "vm1")


class Crash(BaseException):
    """Stands for kill -9 in the middle of a drain."""


async def test_a_sensor_restarted_midway_through_a_drain_does_not_resend_what_was_acted_on(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ferry_cli.cluster import build_service
    from ferry_sensor.service import SensorService

    await hold_backlog(cluster, monkeypatch)
    host = cluster.host("host-a")
    sensor, mo = host.sensor, host.managed_object
    fail_third_chunk(sensor, monkeypatch, Crash())
    with pytest.raises(Crash):
        await sensor.renew()
    assert mo.dispatched_count("vm1") == 20
    await sensor.stop()
    again = build_service("sensor", "host-a", sensor.endpoint.bus, state=sensor.state)
    assert isinstance(again, SensorService)
    await again.start()
    host.services["sensor"] = again
    assert again.vms["vm1"].queued == 25  # the two answered chunks are not held again

    async def all_dispatched() -> bool:
        return mo.dispatched_count("vm1") >= 45
    await until(all_dispatched, 15, "the rest dispatched by the restarted sensor")
    await cluster.settle("vm1")
    assert mo.ledger["vm1"] == [e.id for e in cluster.sent["vm1"]]
    assert mo.planes["vm1"].state["vm1.load"]["seen"] == sum(1 for e in cluster.sent["vm1"] if e.element_id == "vm1")

    async def drain_recorded() -> bool:
        # the last chunk's answer reaches the managed object's ledger before the sensor has
        # cleared its record of answered chunks: wait for the sensor's side too
        return await again.state.items("drained.vm1") == []
    await until(drain_recorded, 10, "the drain's record cleared once the drain got through")
