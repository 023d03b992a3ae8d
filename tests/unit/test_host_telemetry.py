"""Host telemetry figures: /proc parsing, CPU rates from two samples, the sim load model."""

from __future__ import annotations

import os
from pathlib import Path

from ferry_common.clock import FakeClock
from ferry_common.messages.domain import VmSpec
from ferry_hypervisor_adapter.drivers import telemetry
from ferry_hypervisor_adapter.drivers.sim import SimDriver


def test_proc_figures_parse(tmp_path: Path) -> None:
    (tmp_path / "stat").write_text("cpu  100 0 100 700 50 0 0 0 0 0\ncpu0 1 2 3 4\n")
    (tmp_path / "meminfo").write_text("MemTotal:  2048000 kB\nMemFree: 100 kB\nMemAvailable: 1024000 kB\n")
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "stat").write_text("42 (qemu system x86) S 1 2 3 4 5 6 7 8 9 10 300 200 0 0\n")
    (tmp_path / "42" / "status").write_text("Name: qemu\nVmRSS:   512000 kB\n")
    tick = os.sysconf("SC_CLK_TCK")
    assert telemetry.host_cpu_seconds(tmp_path) == 200 / tick  # user + system; idle and iowait left out
    assert telemetry.host_memory_mib(tmp_path) == (2000, 1000.0)
    assert telemetry.process_cpu_seconds(42, tmp_path) == 500 / tick
    assert telemetry.process_rss_mib(42, tmp_path) == 500.0
    assert telemetry.process_cpu_seconds(43, tmp_path) is None


async def test_cpu_meter_is_a_rate_between_two_samples() -> None:
    clock = FakeClock()
    meter = telemetry.CpuMeter(clock)
    assert meter.cores("vm", 10.0) == 0.0  # nothing to compare with yet
    await clock.advance(2.0)
    assert meter.cores("vm", 13.0) == 1.5
    meter.forget(set())
    await clock.advance(1.0)
    assert meter.cores("vm", 20.0) == 0.0  # forgotten: a first sample again


def test_the_real_host_has_figures() -> None:
    assert telemetry.host_cpu_seconds() > 0
    total, used = telemetry.host_memory_mib()
    assert 0 < used <= total
    assert (telemetry.process_cpu_seconds(os.getpid()) or 0) > 0


async def test_the_sim_load_model_travels_in_the_vm_params() -> None:
    driver = SimDriver("host-a", clock=FakeClock(), cpus=8, capacity_mib=4096)
    await driver.create(VmSpec(vm_id="a", memory_mib=1024, vcpus=2, params={"sim_cpu": 1.5}))
    await driver.create(VmSpec(vm_id="b", memory_mib=512))
    driver.set_load("b", cpu=2.0, memory_used_mib=256)
    load = await driver.telemetry()
    assert (load.cpus, load.memory_mib, load.cpu_used, load.memory_used_mib) == (8, 4096, 3.5, 1280.0)
    assert {g.vm_id: (g.cpu, g.memory_used_mib) for g in load.vms} == {"a": (1.5, 1024.0), "b": (2.0, 256.0)}
    [b] = [s for s in await driver.list() if s.vm_id == "b"]
    assert b.params == {"sim_cpu": 2.0, "sim_memory_used_mib": 256.0}
