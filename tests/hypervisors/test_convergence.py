"""Convergence through the real drivers: the downtime ladder, then post-copy or abort.

Every test runs once per driver (QEMU over QMP, libvirt peer-to-peer) with the repo's
dirtying guest under a bandwidth cap, so that pre-copy cannot finish at the first downtime.
"""

from __future__ import annotations

import asyncio

from ferry_hypervisor_adapter.drivers.base import (
    MigrationParams,
    MigrationProgress,
    MigrationResult,
)

from .conftest import Pair

CAP_MIBPS = 32  # under this cap a downtime of d ms sends at most 32 * d / 1000 MiB


class Samples:
    def __init__(self) -> None:
        self.all: list[MigrationProgress] = []

    async def __call__(self, sample: MigrationProgress) -> None:
        self.all.append(sample)

    def rungs(self) -> list[int]:
        return [s.rung for s in self.all]


async def _guest(pair: Pair, dirty_mib: int) -> tuple[str, object]:
    spec = pair.spec(dirty_mib=dirty_mib, rate_mibps=0)  # rewritten flat out
    await pair.source.create(spec)
    await pair.wait_booted(pair.source, spec.vm_id)
    await asyncio.sleep(0.3)  # the whole region is dirty once
    return spec.vm_id, spec


async def _migrate(pair: Pair, dirty_mib: int, params: MigrationParams) -> tuple[str, MigrationResult, Samples]:
    """A dirtying guest migrated from source to target under ``params``, with every sample kept."""
    vm_id, spec = await _guest(pair, dirty_mib)
    uri = await pair.target.prepare_incoming(spec, params)
    samples = Samples()
    return vm_id, await pair.source.migrate(vm_id, uri, params, samples), samples


async def test_a_guest_that_does_not_converge_at_first_completes_up_the_ladder(pair: Pair) -> None:
    # 8 MiB rewritten flat out: more than 100 ms (3.2 MiB) lets through, less than 500 ms (16 MiB)
    params = MigrationParams(bandwidth_mibps=CAP_MIBPS, stall_passes=2, stall_timeout_s=3.0,
                             completion_timeout_min_s=60)

    vm_id, result, samples = await _migrate(pair, 8, params)

    assert result.outcome == "completed", result
    assert not result.postcopy_started
    rungs = samples.rungs()
    assert rungs == sorted(rungs) and max(rungs) >= 1, rungs  # raised at least once, never lowered
    seen = {s.rung: s.downtime_limit_ms for s in samples.all}
    assert seen[0] == 100 and all(seen[r] == (100, 150, 200, 300, 400, 500)[r] for r in seen), seen
    assert await pair.target.finish_incoming(vm_id)
    assert await pair.advancing(pair.target, vm_id), "guest does not run on the target"
    await pair.source.confirm_source(vm_id)


async def test_a_guest_whose_policy_forbids_postcopy_is_aborted_on_the_source(pair: Pair) -> None:
    # 64 MiB rewritten flat out never fits in 150 ms at 32 MiB/s
    params = MigrationParams(bandwidth_mibps=CAP_MIBPS, downtime_limit_ms=100, downtime_ladder_ms=(150,),
                             stall_passes=2, stall_timeout_s=2.0, postcopy="forbid", completion_timeout_min_s=60)

    vm_id, result, samples = await _migrate(pair, 64, params)

    assert result.outcome == "failed" and not result.postcopy_started, result
    assert "stall timeout" in (result.reason or "") and "forbids post-copy" in (result.reason or ""), result
    assert max(samples.rungs()) == 1 and not any(s.postcopy for s in samples.all)
    assert await pair.source.state(vm_id) == "running"
    assert await pair.advancing(pair.source, vm_id), "source guest stopped running"
    await pair.target.abort_incoming(vm_id)
    assert await pair.target.state(vm_id) == "absent"


async def test_a_guest_that_never_converges_completes_in_postcopy(pair: Pair) -> None:
    params = MigrationParams(bandwidth_mibps=CAP_MIBPS, downtime_limit_ms=100, downtime_ladder_ms=(150,),
                             stall_passes=2, stall_timeout_s=2.0, postcopy="allow", completion_timeout_min_s=120)

    vm_id, result, samples = await _migrate(pair, 64, params)

    assert result.outcome == "completed" and result.postcopy_started, result
    assert max(samples.rungs()) == 1
    assert any(s.postcopy for s in samples.all), "no sample says post-copy started"
    assert await pair.target.finish_incoming(vm_id)
    assert await pair.target.state(vm_id) == "running"
    assert await pair.advancing(pair.target, vm_id), "guest does not run on the target"
    assert (await pair.target.guest_status(vm_id)).pages > 0  # its memory came over intact enough to run
    await pair.source.confirm_source(vm_id)
    assert await pair.source.state(vm_id) == "absent"


async def test_a_postcopy_whose_target_dies_fails_and_the_source_is_not_resumed(pair: Pair) -> None:
    vm_id, spec = await _guest(pair, dirty_mib=64)
    # post-copy capped too, so that it is still under way when the first sample says it started
    params = MigrationParams(bandwidth_mibps=CAP_MIBPS, downtime_limit_ms=100, downtime_ladder_ms=(),
                             stall_passes=2, stall_timeout_s=2.0, postcopy="allow", postcopy_bandwidth_mibps=4,
                             completion_timeout_min_s=120)
    uri = await pair.target.prepare_incoming(spec, params)
    killed: list[bool] = []

    async def kill_in_postcopy(sample: MigrationProgress) -> None:
        if sample.postcopy and not killed:
            pair.kill_target(vm_id)  # the guest's newest memory dies with it
            killed.append(True)

    result = await pair.source.migrate(vm_id, uri, params, kill_in_postcopy)

    assert killed and result.outcome == "failed" and result.postcopy_started, result
    await pair.source.cancel_migration(vm_id)  # what a rollback would ask: refused
    assert await pair.source.state(vm_id) != "running", "a stale source was resumed"
