"""Host and guest load figures for ``HostLoad`` (``host.<host>.load``).

A CPU figure is a rate: cores busy over the time between two samples. :class:`CpuMeter` keeps
the previous cumulative reading per key (the host, or a guest) and turns the next one into
cores in use; the first reading of a key says 0 (nothing to compare with yet).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ferry_common.clock import Clock
from ferry_common.messages.domain import VmSpec
from ferry_common.messages.host_events import GuestLoad, HostLoad


class CpuMeter:
    """Cores in use from cumulative CPU seconds, per key."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._last: dict[str, tuple[float, float]] = {}

    def cores(self, key: str, cpu_seconds: float) -> float:
        now = self.clock.monotonic()
        last = self._last.get(key)
        self._last[key] = (now, cpu_seconds)
        if last is None or now <= last[0]:
            return 0.0
        return max(0.0, (cpu_seconds - last[1]) / (now - last[0]))

    def forget(self, keep: set[str]) -> None:
        for key in [k for k in self._last if k not in keep and k != HOST_KEY]:
            del self._last[key]


HOST_KEY = "\0host"
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def host_cpus() -> int:
    return os.cpu_count() or 1


def host_cpu_seconds(proc: Path = Path("/proc")) -> float:
    """Busy CPU seconds of the whole host since boot (``/proc/stat``: all but idle and iowait)."""
    fields = (proc / "stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(f) for f in fields[:8]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / _TICK


def host_memory_mib(proc: Path = Path("/proc")) -> tuple[int, float]:
    """``(total, used)`` MiB from ``/proc/meminfo`` (used: total less available)."""
    info: dict[str, int] = {}
    for line in (proc / "meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            info[name] = int(parts[0])  # kB
    total = info["MemTotal"] / 1024
    available = info.get("MemAvailable", info.get("MemFree", 0)) / 1024
    return int(total), max(0.0, total - available)


def offered_mib(given: int | None) -> int:
    """Memory a real driver's host offers to guests (its inventory's capacity, which placement
    uses): ``given`` (``FERRY_CAPACITY_MIB``), else the host's own."""
    return given if given is not None else host_memory_mib()[0]


def process_cpu_seconds(pid: int, proc: Path = Path("/proc")) -> float | None:
    """utime + stime of a process (a QEMU guest), or None when it is gone."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / _TICK


def process_rss_mib(pid: int, proc: Path = Path("/proc")) -> float | None:
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def host_load(host: str, meter: CpuMeter, guests: list[GuestLoad]) -> HostLoad:
    """The real host's figures from ``/proc`` with ``guests``' own."""
    total, used = host_memory_mib()
    return HostLoad(host=host, at=time.time(), cpus=host_cpus(), memory_mib=max(1, total),
                    cpu_used=min(meter.cores(HOST_KEY, host_cpu_seconds()), float(host_cpus())),
                    memory_used_mib=used, vms=guests)


def process_guests(meter: CpuMeter, guests: list[tuple[VmSpec, int | None]]) -> list[GuestLoad]:
    """Guests that are processes (QEMU): CPU time and resident memory from ``/proc/PID``."""
    out = []
    for spec, pid in guests:
        seconds = process_cpu_seconds(pid) if pid is not None else None
        rss = process_rss_mib(pid) if pid is not None else None
        cpu = meter.cores(spec.vm_id, seconds) if seconds is not None else 0.0
        out.append(GuestLoad(vm_id=spec.vm_id, cpu=min(cpu, 4096.0), memory_mib=spec.memory_mib, vcpus=spec.vcpus,
                             memory_used_mib=min(rss if rss is not None else spec.memory_mib, float(spec.memory_mib))))
    meter.forget({spec.vm_id for spec, _ in guests})
    return out


def _libvirt_cpu_ns(dom: Any) -> float:
    """The domain's CPU time: its cgroup's (``getCPUStats``), or, on a host without the cpuacct
    controller (libvirt refuses the call there), what ``info()`` reports."""
    try:
        return float(dom.getCPUStats(True)[0].get("cpu_time", 0))
    except Exception:
        return float(dom.info()[4])


def libvirt_guest(meter: CpuMeter, spec: VmSpec, dom: Any) -> GuestLoad:
    """One libvirt domain: total CPU time (``getCPUStats(True)``, ns) and memory in use
    (``memoryStats``: the balloon's actual size less what the guest reports unused)."""
    try:
        cpu = meter.cores(spec.vm_id, _libvirt_cpu_ns(dom) / 1e9)
    except Exception:  # a domain that stopped meanwhile: no figure, not a failure
        cpu = 0.0
    try:
        stats = dom.memoryStats()
        actual = stats.get("actual", spec.memory_mib * 1024)
        used = (actual - stats["unused"]) if "unused" in stats else stats.get("rss", actual)
        mem = float(used) / 1024
    except Exception:
        mem = float(spec.memory_mib)
    return GuestLoad(vm_id=spec.vm_id, cpu=min(cpu, 4096.0), memory_mib=spec.memory_mib, vcpus=spec.vcpus,
                     memory_used_mib=max(0.0, min(mem, float(spec.memory_mib))))
