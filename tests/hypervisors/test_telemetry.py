"""Each driver's telemetry (``HostLoad``): the host's figures and a running guest's, from the
hypervisor itself (QEMU: /proc of its process; libvirt: the domain's statistics)."""

from __future__ import annotations

import asyncio

from .conftest import Pair


async def test_a_busy_guest_shows_in_its_hosts_load(pair: Pair) -> None:
    spec = pair.spec(memory_mib=128, dirty_mib=16, rate_mibps=0)  # flat out: a guest that keeps its vCPU busy
    await pair.source.create(spec)
    await pair.wait_booted(pair.source, spec.vm_id)
    await pair.source.telemetry()  # CPU figures are rates: the first sample is the baseline
    await asyncio.sleep(1.0)
    load = await pair.source.telemetry()
    assert load.host == pair.source.host and load.cpus >= 1 and load.memory_mib > 0
    [guest] = [g for g in load.vms if g.vm_id == spec.vm_id]
    assert guest.memory_mib == 128 and 0 < guest.memory_used_mib <= 128
    if pair.kind != "sim":  # the sim's load is its model (sim_cpu), 0 here
        assert guest.cpu > 0.05, guest
        assert load.cpu_used > 0.05 and 0 < load.memory_used_mib <= load.memory_mib
