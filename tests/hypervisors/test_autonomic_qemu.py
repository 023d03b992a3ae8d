"""The balancer on real hypervisors: a critical fault on a QEMU host, under partial mode,
evacuates it through a drain; the guest lands on the other QEMU host with its plane."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ferry_common.bus.topology import host_event
from ferry_common.messages.host_events import HostFaultEvent
from ferry_coordinator.fleet.queue import Priority
from tests.harness import Cluster, inspect_problems, until
from tests.integration.autonomic_support import options

from .conftest import require_qemu, short_dir
from .saga_support import host_options, saga_cluster, start_guest

pytestmark = [pytest.mark.qemu, pytest.mark.rabbitmq]


@pytest.fixture
async def cluster(guest_image: Path, rabbitmq_available: None) -> AsyncIterator[Cluster]:
    require_qemu()
    base = short_dir("fa-")
    opts = host_options("qemu", {h: {"run_dir": str(base / h[-1]), "guest_image": str(guest_image)}
                                 for h in ("host-a", "host-b")})
    async with saga_cluster(opts) as c:
        c.coordinator.autonomic.options = options("partial")
        yield c
    shutil.rmtree(base, ignore_errors=True)


async def test_a_fault_evacuates_a_qemu_guest_with_its_plane(cluster: Cluster) -> None:
    g = await start_guest(cluster, {})
    fault = HostFaultEvent(id="qf-1", host="host-a", kind="disk", severity="critical", message="smart failing")
    await cluster.client.endpoint.send(host_event("host-a"), fault)

    async def evacuated() -> bool:
        d = await cluster.store.drains.latest("host-a")
        return d is not None and not d.open
    await until(evacuated, 120, "host-a to be evacuated")
    d = await cluster.store.drains.latest("host-a")
    assert d is not None and d.state.value == "drained" and d.priority == Priority.EVACUATION, d
    [vm] = d.vms.values()
    assert vm.vm_id == g.vm_id and vm.target == "host-b"
    rec = await cluster.store.get(vm.migration_id or "")
    assert rec is not None and rec.status == "completed"
    assert rec.data["why"]["kind"] == "fault" and rec.data["why"]["level"] == "partial"
    assert await g.advancing("host-b"), "the guest does not run on host-b"
    assert await g.driver("host-a").state(g.vm_id) == "absent"
    await cluster.send_events(g.vm_id, 10)
    assert await inspect_problems(cluster, g.vm_id, "host-b") == []
