"""The driver contract: live migration through each driver (the simulation, QEMU over QMP,
libvirt peer-to-peer), one host pair.

Every test taking ``pair`` runs unchanged once per driver; the ``qemu_pair`` ones need
QEMU's own specifics. The guest is the repo's dirtying multiboot guest (guest/),
whose heartbeat at a fixed address shows where its vCPU runs.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from ferry_hypervisor_adapter.drivers.base import (
    MigrationParams,
    MigrationProgress,
    MigrationResult,
)

from .conftest import Pair

# a guest that rewrites 64 MiB flat out never converges under a 32 MiB/s cap
STUCK = {"dirty_mib": 64, "rate_mibps": 0}
CAPPED: dict[str, Any] = {"downtime_limit_ms": 50, "bandwidth_mibps": 32}


class Recorder:
    """Collects progress samples; ``seen`` fires once pre-copy is under way."""

    def __init__(self) -> None:
        self.samples: list[MigrationProgress] = []
        self.seen = asyncio.Event()

    async def __call__(self, sample: MigrationProgress) -> None:
        self.samples.append(sample)
        if sample.transferred_bytes > 0:
            self.seen.set()


async def _start_source(pair: Pair, **guest: int) -> tuple[str, object]:
    spec = pair.spec(**guest)
    await pair.source.create(spec)
    await pair.wait_booted(pair.source, spec.vm_id)
    return spec.vm_id, spec


async def _under_way(pair: Pair) -> tuple[str, asyncio.Task[MigrationResult]]:
    """A never-converging guest's migration, once pre-copy has sent some memory."""
    vm_id, spec = await _start_source(pair, **STUCK)
    params = MigrationParams(**CAPPED)
    uri = await pair.target.prepare_incoming(spec, params)
    progress = Recorder()
    migration = asyncio.create_task(pair.source.migrate(vm_id, uri, params, progress))
    await asyncio.wait_for(progress.seen.wait(), 20)
    return vm_id, migration


async def _assert_source_kept(pair: Pair, vm_id: str) -> None:
    assert await pair.source.state(vm_id) == "running"
    assert await pair.advancing(pair.source, vm_id), "source guest stopped running"
    assert vm_id in [s.vm_id for s in await pair.source.list()]


async def test_completed_migration_moves_the_running_guest(pair: Pair) -> None:
    vm_id, spec = await _start_source(pair, dirty_mib=16, rate_mibps=64)
    await asyncio.sleep(0.5)  # the guest has written its whole region at least once
    params = MigrationParams()
    uri = await pair.target.prepare_incoming(spec, params)
    assert await pair.target.prepare_incoming(spec, params) == uri  # idempotent
    progress = Recorder()

    result = await pair.source.migrate(vm_id, uri, params, progress)

    assert result.outcome == "completed", result
    stats = result.stats
    assert stats["total_time_ms"] > 0 and stats["transferred_bytes"] > 16 * 1024 * 1024
    assert 0 <= stats["downtime_ms"] <= 1000, stats
    assert progress.samples and progress.samples[-1].percent == 100.0
    assert all(0 <= s.percent <= 100 for s in progress.samples)
    assert await pair.target.finish_incoming(vm_id)
    assert await pair.target.state(vm_id) == "running"
    assert await pair.advancing(pair.target, vm_id), "guest does not run on the target"
    # the source is frozen (QEMU: postmigrate, counter still) or gone (libvirt p2p)
    if await pair.source.state(vm_id) != "absent":
        assert await pair.source.state(vm_id) == "postmigrate"
        assert not await pair.advancing(pair.source, vm_id), "guest still runs on the source"
        replay = await pair.source.migrate(vm_id, uri, params, progress)
        assert replay.outcome == "completed"  # a replayed step does not migrate again
    await pair.source.confirm_source(vm_id)
    assert await pair.source.state(vm_id) == "absent"
    assert [s.vm_id for s in await pair.target.list()] == [vm_id]
    await pair.target.abort_incoming(vm_id)  # a finished incoming guest is not torn down
    assert await pair.target.state(vm_id) == "running"


async def test_non_converging_guest_hits_completion_timeout(pair: Pair) -> None:
    vm_id, spec = await _start_source(pair, **STUCK)
    params = MigrationParams(**CAPPED, completion_timeout_min_s=5, completion_timeout_per_gib_s=0)
    uri = await pair.target.prepare_incoming(spec, params)
    progress = Recorder()

    started = time.monotonic()
    result = await pair.source.migrate(vm_id, uri, params, progress)
    elapsed = time.monotonic() - started

    assert result.outcome == "failed" and "completion timeout" in (result.reason or ""), result
    assert 5 <= elapsed < 12, elapsed
    percents = [s.percent for s in progress.samples if s.total_bytes]
    # honest percent: pages redirtied after the first pass push it back down
    assert any(later < max(percents[:i]) for i, later in enumerate(percents) if i), percents
    await _assert_source_kept(pair, vm_id)
    await pair.target.abort_incoming(vm_id)
    assert await pair.target.state(vm_id) == "absent"


async def test_stall_timeout_cancels_a_migration_without_progress(pair: Pair) -> None:
    vm_id, spec = await _start_source(pair, **STUCK)
    params = MigrationParams(**CAPPED, stall_timeout_s=2)
    uri = await pair.target.prepare_incoming(spec, params)

    result = await pair.source.migrate(vm_id, uri, params, Recorder())

    assert result.outcome == "failed" and "stall timeout" in (result.reason or ""), result
    await _assert_source_kept(pair, vm_id)
    await pair.target.abort_incoming(vm_id)
    assert await pair.target.state(vm_id) == "absent"


async def test_operator_cancel_keeps_the_source_running(pair: Pair) -> None:
    vm_id, migration = await _under_way(pair)

    await pair.source.cancel_migration(vm_id)
    result = await asyncio.wait_for(migration, 20)

    assert result.outcome == "cancelled", result
    await _assert_source_kept(pair, vm_id)
    await pair.target.abort_incoming(vm_id)
    assert await pair.target.state(vm_id) == "absent"
    await pair.source.cancel_migration(vm_id)  # idempotent: nothing left to cancel
    assert await pair.source.state(vm_id) == "running"


async def test_target_dying_mid_migration_keeps_the_source_running(pair: Pair) -> None:
    vm_id, migration = await _under_way(pair)

    pair.kill_target(vm_id)
    result = await asyncio.wait_for(migration, 30)

    assert result.outcome == "failed", result
    await _assert_source_kept(pair, vm_id)
    await pair.target.abort_incoming(vm_id)
    assert await pair.target.state(vm_id) == "absent"


async def test_qemu_commands_sent_together_share_one_qmp_connection(qemu_pair: Pair, guest_image: Path) -> None:
    """QEMU serves one QMP client at a time: commands that reach a driver together before it
    has connected (an adapter just restarted, the migration's pipelined queries) share the
    connection the first one makes; a second connection would wait for its greeting forever."""
    from ferry_hypervisor_adapter.drivers.qemu import QemuDriver

    vm_id, _ = await _start_source(qemu_pair)
    await qemu_pair.source.close()  # the adapter stopped; its guest runs on
    fresh = QemuDriver("host-a", run_dir=qemu_pair.source.run_dir, guest_image=guest_image)
    try:
        states = await asyncio.wait_for(asyncio.gather(*(fresh.state(vm_id) for _ in range(3))), 10)
        assert states == ["running"] * 3
    finally:
        await fresh.close()
    assert await qemu_pair.source.state(vm_id) == "running"  # closing a driver leaves its guests running


async def test_a_source_resumed_after_its_migration_completed_is_not_torn_down(qemu_pair: Pair) -> None:
    """The teardown of a source whose migration this driver saw complete skips asking QEMU
    what it runs, unless the guest was resumed since: a cancel after the switch-over (QEMU's
    ``cont``) keeps it, so a late teardown must find it running and leave it alone."""
    pair = qemu_pair
    vm_id, spec = await _start_source(pair)
    params = MigrationParams()
    uri = await pair.target.prepare_incoming(spec, params)
    result = await pair.source.migrate(vm_id, uri, params, Recorder())
    assert result.outcome == "completed", result
    await pair.source.cancel_migration(vm_id)  # after the copy: the source resumes the guest
    await pair.target.destroy(vm_id)
    await pair.source.confirm_source(vm_id)
    await _assert_source_kept(pair, vm_id)
