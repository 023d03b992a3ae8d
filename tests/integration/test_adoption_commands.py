"""Adoption commands on hosts whose driver cannot adopt (the simulated one), on both buses:
a clear refusal, and nothing changed."""

from __future__ import annotations

import pytest

from ferry_cli.sample import MODULES, graph
from ferry_common.errors import RemoteError
from tests.harness import Cluster, inspect_problems, make_cluster


@pytest.fixture
async def cluster(bus_kind: str):
    c = await make_cluster(bus_kind, ("host-a", "host-b"))
    yield c
    await c.close()


async def test_adopting_where_the_driver_cannot_is_refused_and_changes_nothing(cluster: Cluster) -> None:
    with pytest.raises(RemoteError, match="sim driver of host-a does not manage existing guests"):
        await cluster.client.adopt_vm("host-a", "db-1", graph, MODULES)
    seen = await cluster.client.inspect("host-a")
    assert "db-1" not in seen["managed_object"]["planes"] and "db-1" not in seen["sensor"]["vms"]


async def test_release_the_adapter_cannot_do_changes_nothing(cluster: Cluster) -> None:
    await cluster.create_vm("host-a", "web-1")
    await cluster.send_events("web-1", 5)
    with pytest.raises(RemoteError, match="does not manage existing guests"):
        await cluster.client.release_vm("host-a", "web-1")
    # refused before the plane or the events were touched
    await cluster.send_events("web-1", 5)
    assert await inspect_problems(cluster, "web-1", "host-a") == []
