"""A simulated hypervisor: pre-copy live migration as arithmetic over time.

A VM has a memory size, a dirty rate and a link bandwidth (``VmSpec.params``:
``sim_dirty_mibps``, ``sim_bandwidth_mibps``; ``sim_instant`` skips the timing).
Each pass sends what the previous pass left dirty; the migration converges when the
rest fits in the downtime limit, and fails its timeouts like a real one would.
``sim_fail`` makes it fail on purpose: ``migrate`` (the stream breaks halfway),
``incoming`` (the target cannot start the guest), ``finish`` (the guest does not run
on the target afterwards), ``postcopy`` (after its first pass the migration switches to
post-copy and then its stream breaks: the guest is left paused on both hosts). ``sim_source_crash`` makes the source guest vanish as soon as
its migration completed (its process died).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import orjson

from ferry_common.clock import Clock, SystemClock
from ferry_common.messages.domain import VmSpec

from .base import MigrationParams, MigrationProgress, MigrationResult, ProgressCallback, VmState

MIB = 1024 * 1024


@dataclass
class SimVm:
    spec: VmSpec
    state: VmState = "running"
    migration_cancelled: bool = False
    migrating: bool = False
    history: list[str] = field(default_factory=list)


class SimDriver:
    name = "sim"
    can_resume_source_after_completion = True

    def __init__(
        self, host: str, *, clock: Clock | None = None, capacity_mib: int = 65536, state_file: str | None = None
    ) -> None:
        self.host = host
        self.clock = clock or SystemClock()
        self.capacity_mib = capacity_mib
        # the simulated hypervisor outlives the adapter process, as a real one does
        self.state_file = state_file
        self.vms: dict[str, SimVm] = {}
        if state_file and os.path.exists(state_file):
            with open(state_file, "rb") as f:
                for raw in orjson.loads(f.read()):
                    # a migration in flight died with the process that simulated it: its guest
                    # is still "running" here; a finished one stays "postmigrate", as in QEMU
                    self.vms[raw["spec"]["vm_id"]] = SimVm(VmSpec.model_validate(raw["spec"]), state=raw["state"])

    def _save(self) -> None:
        if not self.state_file:
            return
        tmp = self.state_file + ".tmp"
        with open(tmp, "wb") as f:
            f.write(orjson.dumps([{"spec": v.spec.model_dump(mode="json"), "state": v.state} for v in self.vms.values()]))
        os.replace(tmp, self.state_file)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def create(self, spec: VmSpec) -> None:
        self.vms[spec.vm_id] = SimVm(spec)
        self._save()

    async def destroy(self, vm_id: str) -> None:
        self.vms.pop(vm_id, None)
        self._save()

    async def list(self) -> list[VmSpec]:
        return [vm.spec for vm in self.vms.values() if vm.state in ("running", "paused")]

    async def state(self, vm_id: str) -> VmState:
        vm = self.vms.get(vm_id)
        return vm.state if vm else "absent"

    async def prepare_incoming(self, spec: VmSpec, params: MigrationParams) -> str:
        if spec.params.get("sim_fail") == "incoming":
            raise RuntimeError("simulated failure: target cannot start the incoming guest")
        current = self.vms.get(spec.vm_id)
        if current is None or current.state == "absent":
            self.vms[spec.vm_id] = SimVm(spec, state="inmigrate")
            self._save()
        return f"sim://{self.host}/{spec.vm_id}"

    async def take_ready_incoming(self, spec: VmSpec) -> str | None:
        return None  # nothing is kept running ahead of a migration

    def ready_shapes(self) -> tuple[str, ...]:
        return ()

    async def migrate(
        self, vm_id: str, uri: str, params: MigrationParams, on_progress: ProgressCallback
    ) -> MigrationResult:
        vm = self.vms.get(vm_id)
        if vm is None or vm.state != "running":
            return MigrationResult("failed", f"vm {vm_id} is not running here")
        vm.migrating, vm.migration_cancelled = True, False
        try:
            result = await self._precopy(vm, params, on_progress)
            if result.outcome == "completed" and vm.spec.params.get("sim_source_crash"):
                # the source process dies right after the hypervisor finished: the only copy
                # of the guest is the target's
                self.vms.pop(vm.spec.vm_id, None)
            return result
        finally:
            vm.migrating = False
            self._save()

    async def _precopy(self, vm: SimVm, params: MigrationParams, on_progress: ProgressCallback) -> MigrationResult:
        p = vm.spec.params
        total = vm.spec.memory_mib * MIB
        started = self.clock.monotonic()
        if p.get("sim_instant"):
            await on_progress(MigrationProgress("completed", total, total, 0, 0, 1, 100.0))
            vm.state = "postmigrate"
            return MigrationResult("completed", stats=_stats(0.0, 0.0, total))
        bandwidth = float(params.bandwidth_mibps or p.get("sim_bandwidth_mibps", 1024)) * MIB
        dirty = float(p.get("sim_dirty_mibps", 0)) * MIB
        deadline = started + params.completion_timeout_s(vm.spec.memory_mib)
        remaining, sent, passes = float(total), 0.0, 0
        best, best_at = remaining, started
        while True:
            passes += 1
            pass_bytes = remaining
            pass_time = pass_bytes / bandwidth
            # sleep the pass in slices so cancel and timeouts are noticed promptly
            elapsed = 0.0
            while elapsed < pass_time:
                step = min(params.poll_interval_s, pass_time - elapsed)
                await self.clock.sleep(step)
                elapsed += step
                if vm.migration_cancelled:
                    return MigrationResult("cancelled", "migration cancelled", _stats(self.clock.monotonic() - started, 0, sent))
                now = self.clock.monotonic()
                if now > deadline:
                    return MigrationResult("failed", "completion timeout: pre-copy did not converge", _stats(now - started, 0, sent))
                if now - best_at > params.stall_timeout_s:
                    return MigrationResult("failed", "stall timeout: no progress", _stats(now - started, 0, sent))
            if p.get("sim_fail") == "postcopy":
                await on_progress(MigrationProgress("postcopy-active", total, int(sent + pass_bytes), 0, 0, passes,
                                                    100.0, postcopy=True))
                await self.clock.sleep(params.poll_interval_s)
                vm.state = "paused"  # its newest memory was on the target: it can run nowhere
                return MigrationResult("failed", "simulated failure: the post-copy stream broke",
                                       _stats(self.clock.monotonic() - started, 0, sent + pass_bytes),
                                       postcopy_started=True)
            if p.get("sim_fail") == "migrate":
                return MigrationResult("failed", "simulated failure: migration stream broke", _stats(pass_time, 0, sent))
            sent += pass_bytes
            remaining = min(float(total), dirty * pass_time)
            if remaining < best:
                best, best_at = remaining, self.clock.monotonic()
            await on_progress(
                MigrationProgress(
                    "active",
                    total,
                    int(sent),
                    int(remaining),
                    int(dirty / 4096),
                    passes,
                    round(100.0 * (1 - remaining / total), 2),
                )
            )
            if remaining / bandwidth * 1000 <= params.downtime_limit_ms:
                downtime = remaining / bandwidth
                await self.clock.sleep(downtime)
                sent += remaining
                vm.state = "postmigrate"
                await on_progress(MigrationProgress("completed", total, int(sent), 0, 0, passes + 1, 100.0))
                return MigrationResult("completed", stats=_stats(self.clock.monotonic() - started, downtime, sent))

    async def cancel_migration(self, vm_id: str) -> None:
        vm = self.vms.get(vm_id)
        if vm is None:
            return
        if vm.migrating:
            vm.migration_cancelled = True
        if vm.state == "postmigrate":
            # cancelled after the switch-over point in the hypervisor: resume the source
            vm.state = "running"
            self._save()

    async def finish_incoming(self, vm_id: str) -> bool:
        vm = self.vms.get(vm_id)
        if vm is None:
            return False
        if vm.spec.params.get("sim_fail") == "finish":
            return False
        if vm.state == "inmigrate":
            vm.state = "running"
            self._save()
        return vm.state == "running"

    async def abort_incoming(self, vm_id: str) -> None:
        vm = self.vms.get(vm_id)
        if vm is not None and vm.state == "inmigrate":
            del self.vms[vm_id]
            self._save()

    async def confirm_source(self, vm_id: str) -> None:
        vm = self.vms.get(vm_id)
        if vm is not None and vm.state in ("postmigrate", "paused"):
            del self.vms[vm_id]
            self._save()


def _stats(total_s: float, downtime_s: float, sent: float) -> dict[str, float]:
    return {
        "total_time_ms": round(total_s * 1000, 3),
        "downtime_ms": round(downtime_s * 1000, 3),
        "setup_time_ms": 0.0,
        "transferred_bytes": int(sent),
    }
