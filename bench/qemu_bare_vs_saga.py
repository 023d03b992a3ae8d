"""Bare QEMU live migration versus the same migration run as a Ferry saga.

Part (a), here: :func:`bare_migration` times one migration of the test guest between two
QEMU processes on this machine through the QEMU driver alone (no bus, no saga), and
:func:`bare_series` repeats it and reports medians. Part (b) plugs in as another
``async def ...(guest, memory_mib, params) -> dict`` with the same keys, registered in
:data:`RUNNERS`, so both print side by side.

    .venv/bin/python bench/qemu_bare_vs_saga.py --reps 5 [--json]

Guests: ``idle`` (the test guest with nothing to dirty: it only bumps its counters) and
``dirty`` (rewrites ``--dirty-mib`` MiB at ``--rate-mibps``, 0 = flat out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ferry_common.messages.domain import VmSpec
from ferry_hypervisor_adapter.drivers.base import MigrationParams, MigrationProgress
from ferry_hypervisor_adapter.drivers.guest import build_guest
from ferry_hypervisor_adapter.drivers.qemu import QemuDriver

GUESTS: dict[str, dict[str, int]] = {
    "idle": {"guest_dirty_mib": 0, "guest_rate_mibps": 0},
    "dirty": {"guest_dirty_mib": 16, "guest_rate_mibps": 0},
}
TIMING_KEYS = (
    "wall_ms",
    "total_time_ms",
    "downtime_ms",
    "setup_time_ms",
    "transferred_bytes",
    "passes",
)

Runner = Callable[[dict[str, int], int, MigrationParams], Awaitable[dict[str, Any]]]


async def bare_migration(
    guest: dict[str, int], memory_mib: int = 128, params: MigrationParams | None = None
) -> dict[str, Any]:
    """One source-to-target migration through :class:`QemuDriver`; its timings.

    ``wall_ms`` runs from ``migrate`` until ``finish_incoming`` confirms the guest runs on the
    target; the other figures are QEMU's own (``query-migrate``).
    """
    params = params or MigrationParams()
    base = Path(tempfile.mkdtemp(prefix="fb-", dir="/tmp"))
    source = QemuDriver("bench-a", run_dir=base / "a")
    target = QemuDriver("bench-b", run_dir=base / "b")
    spec = VmSpec(
        vm_id=f"b-{uuid.uuid4().hex[:8]}", memory_mib=memory_mib, driver="qemu", params=guest
    )
    try:
        await source.start()
        await target.start()
        await source.create(spec)
        await asyncio.sleep(1.0)  # boot, and let a dirtying guest touch its whole region
        uri = await target.prepare_incoming(spec, params)

        async def ignore(_: MigrationProgress) -> None:
            return None

        started = time.perf_counter()
        result = await source.migrate(spec.vm_id, uri, params, ignore)
        running = await target.finish_incoming(spec.vm_id)
        wall_ms = (time.perf_counter() - started) * 1000
        if result.outcome != "completed" or not running:
            raise RuntimeError(f"bench migration did not complete: {result}")
        return {"wall_ms": round(wall_ms, 3), **result.stats}
    finally:
        for driver in (source, target):
            await driver.destroy(spec.vm_id)
            await driver.close()
        shutil.rmtree(base, ignore_errors=True)


async def bare_series(
    runner: Runner,
    guest: dict[str, int],
    reps: int,
    memory_mib: int = 128,
    params: MigrationParams | None = None,
) -> dict[str, Any]:
    """``reps`` runs of ``runner``; the median of every timing key and the raw runs."""
    runs = [await runner(guest, memory_mib, params or MigrationParams()) for _ in range(reps)]
    medians = {
        k: statistics.median(r[k] for r in runs) for k in TIMING_KEYS if all(k in r for r in runs)
    }
    return {"reps": reps, "median": medians, "runs": runs}


RUNNERS: dict[str, Runner] = {"bare": bare_migration}


async def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--memory-mib", type=int, default=128)
    parser.add_argument("--dirty-mib", type=int, default=16)
    parser.add_argument("--rate-mibps", type=int, default=0)
    parser.add_argument(
        "--runners", default=",".join(RUNNERS), help="comma-separated: " + ",".join(RUNNERS)
    )
    parser.add_argument("--json", action="store_true", help="print the full results as JSON")
    args = parser.parse_args(argv)
    build_guest()
    guests = {
        "idle": GUESTS["idle"],
        "dirty": {"guest_dirty_mib": args.dirty_mib, "guest_rate_mibps": args.rate_mibps},
    }
    report: dict[str, Any] = {}
    for name in args.runners.split(","):
        for guest_name, guest in guests.items():
            report[f"{name}/{guest_name}"] = await bare_series(
                RUNNERS[name], guest, args.reps, args.memory_mib
            )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{'run':<16}" + "".join(f"{k:>18}" for k in TIMING_KEYS) + "   (medians)")
        for key, series in report.items():
            med = series["median"]
            print(f"{key:<16}" + "".join(f"{med.get(k, float('nan')):>18.1f}" for k in TIMING_KEYS))
    return report


if __name__ == "__main__":
    asyncio.run(main())
