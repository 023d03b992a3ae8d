"""The ``split`` runner's parts for bench/qemu_bare_vs_saga.py: each host service in a process of
its own (``ferry service NAME --host HOST``), and what that costs against one process."""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ferry_common.bus.topology import HOST_SERVICES


def service_processes(url: str, hosts: tuple[str, ...], standby: str | None) -> list[subprocess.Popen[bytes]]:
    """Each host service of ``hosts`` in a process of its own on the broker at ``url``, as the
    deployment runs them: state in memory, no span shipping, inventory every second, QEMU
    driver keeping receiving processes of the ``standby`` shape ready."""
    ferry = str(Path(sys.executable).with_name("ferry"))
    procs = []
    for host in hosts:
        for name in HOST_SERVICES:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            env = {**os.environ, "AMQP_URL": url, "FERRY_DRIVER": "qemu", "FERRY_STATE_DIR": "",
                   "FERRY_HEALTH_PORT": str(port), "FERRY_TRACE_COLLECT": "0", "FERRY_INVENTORY_INTERVAL_S": "1",
                   "FERRY_AUTH": "none", "FERRY_CAPACITY_MIB": "8192"}
            if standby:
                env["FERRY_QEMU_STANDBY"] = standby
            with open(f"/tmp/{host}-{name}.log", "wb") as log:  # the child keeps its own copy
                proc = subprocess.Popen([ferry, "service", name, "--host", host], env=env,
                                        stdout=log, stderr=subprocess.STDOUT)
            proc.health_port = port  # type: ignore[attr-defined]
            procs.append(proc)
    return procs


async def ready(procs: list[subprocess.Popen[bytes]], deadline: float) -> None:
    """Until every process's /readyz answers 200 (its queues are bound)."""
    import urllib.request

    def ok(port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    waiting = list(procs)
    while waiting:
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise RuntimeError("a host service process did not become ready (logs: /tmp/<host>-<service>.log)")
        waiting = [p for p in waiting if not await asyncio.to_thread(ok, p.health_port)]  # type: ignore[attr-defined]
        await asyncio.sleep(0.1)


def compare_split(report: dict[str, Any], guests: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Per guest: what running each host service in its own process costs over one process
    per cluster, as the wall medians, the same rounds' paired difference, and that difference
    in floor round trips (each run's own floor)."""
    out: dict[str, dict[str, Any]] = {}
    for guest_name in guests:
        saga, split = report.get(f"saga/{guest_name}"), report.get(f"split/{guest_name}")
        if not saga or not split:
            continue
        pairs = list(zip(split["runs"], saga["runs"], strict=True))
        out[guest_name] = {
            "saga_wall_ms": round(saga["median"]["wall_ms"], 1),
            "split_wall_ms": round(split["median"]["wall_ms"], 1),
            "ratio": round(split["median"]["wall_ms"] / saga["median"]["wall_ms"], 2),
            "split_minus_saga_paired_ms": round(statistics.median(sp["wall_ms"] - sg["wall_ms"] for sp, sg in pairs), 1),
            "floor_rtt_ms": round(statistics.median(r["floor_rtt_ms"] for r in split["runs"] + saga["runs"]), 2),
            "split_minus_saga_in_floor_rtts": round(
                statistics.median((sp["wall_ms"] - sg["wall_ms"]) / ((sp["floor_rtt_ms"] + sg["floor_rtt_ms"]) / 2)
                                  for sp, sg in pairs), 1
            ),
            "split_steps_ms": {k: round(statistics.median(r["steps_ms"].get(k, 0.0) for r in split["runs"]), 1)
                               for k in split["runs"][0]["steps_ms"]},
        }
    return out
