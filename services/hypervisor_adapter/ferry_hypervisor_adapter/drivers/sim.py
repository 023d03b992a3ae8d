"""A simulated hypervisor: pre-copy live migration as arithmetic over time.

A VM has a memory size, a dirty rate and a link bandwidth (``VmSpec.params``:
``sim_dirty_mibps``, ``sim_bandwidth_mibps``; ``sim_instant`` skips the timing). The test
guest's own parameters (``guest_dirty_mib``, ``guest_rate_mibps``, see :mod:`.guest`) are
read as they are by the real drivers: the guest rewrites that much memory at that rate
(0: flat out). Each pass sends what the previous pass left dirty; the migration converges
when the rest fits in the downtime limit, and fails its timeouts as a real one does (the
same :class:`~.precopy.PrecopyWatch`), reporting progress at every poll.

``sim_fail`` makes it fail on purpose: ``migrate`` (the stream breaks halfway),
``incoming`` (the target cannot start the guest), ``finish`` (the guest does not run
on the target afterwards), ``postcopy`` (after its first pass the migration switches to
post-copy and then its stream breaks: the guest is left paused on both hosts). ``sim_source_crash`` makes the source guest vanish as soon as
its migration completed (its process died). Drivers given the same :class:`SimNetwork`
see each other: a migration whose target guest dies (:meth:`SimDriver.kill`) breaks.
"""

from __future__ import annotations

import os

import orjson

from ferry_common.clock import Clock, SystemClock
from ferry_common.messages.domain import VmSpec
from ferry_common.messages.host_events import GuestLoad, HostLoad

from .base import MigrationParams, MigrationProgress, MigrationResult, ProgressCallback, VmState
from .convergence import Convergence, Ladder
from .guest import STATUS_MAGIC, GuestStatus
from .precopy import PrecopyWatch

MIB = 1024 * 1024
PAGE = 4096
#: what "as fast as it can" means for a guest rewriting memory (a vCPU does GiB/s)
FLAT_OUT_MIBPS = 4096.0


class SimVm:
    """One simulated guest; its heartbeat advances while (and only while) it runs."""

    def __init__(self, spec: VmSpec, clock: Clock, state: VmState = "running") -> None:
        self.spec = spec
        self.migration_cancelled = False
        self.migrating = False
        self.completed: MigrationResult | None = None  # the migration that moved it away
        self._clock = clock
        self._ran_s = 0.0
        self._since = clock.monotonic()
        self._state: VmState = state

    @property
    def state(self) -> VmState:
        return self._state

    @state.setter
    def state(self, new: VmState) -> None:
        now = self._clock.monotonic()
        if self._state == "running":
            self._ran_s += now - self._since
        self._state, self._since = new, now

    def status(self) -> GuestStatus:
        """The guest's status block as the test guest keeps it (heartbeat: ms of running)."""
        ran = self._ran_s + (self._clock.monotonic() - self._since if self._state == "running" else 0.0)
        ms = int(ran * 1000)
        # the pages of its working set it keeps rewriting, as the test guest counts them
        pages = int(float(self.spec.params.get("guest_dirty_mib", 0)) * MIB) // PAGE if ms else 0  # type: ignore[arg-type]
        return GuestStatus(STATUS_MAGIC, ms, ms, pages)


class SimNetwork:
    """The hosts whose simulated drivers can reach each other, by host name."""

    def __init__(self) -> None:
        self.hosts: dict[str, SimDriver] = {}

    def incoming(self, uri: str) -> tuple[bool, SimVm | None]:
        """Whether the host a ``sim://HOST/VM`` URI names is on this network, and its guest."""
        host, _, vm_id = uri.removeprefix("sim://").partition("/")
        driver = self.hosts.get(host)
        return (False, None) if driver is None else (True, driver.vms.get(vm_id))


class SimDriver:
    name = "sim"
    can_resume_source_after_completion = True

    def __init__(
        self,
        host: str,
        *,
        clock: Clock | None = None,
        capacity_mib: int = 65536,
        state_file: str | None = None,
        network: SimNetwork | None = None,
        cpus: int = 16,
    ) -> None:
        self.host = host
        self.cpus = int(cpus)  # the simulated host's cores (its load: telemetry())
        self.clock = clock or SystemClock()
        self.capacity_mib = capacity_mib
        # the simulated hypervisor outlives the adapter process, as a real one does
        self.state_file = state_file
        self.network = network
        if network is not None:
            network.hosts[host] = self
        self.vms: dict[str, SimVm] = {}
        if state_file and os.path.exists(state_file):
            with open(state_file, "rb") as f:
                for raw in orjson.loads(f.read()):
                    # a migration in flight died with the process that simulated it: its guest
                    # is still "running" here; a finished one stays "postmigrate", as in QEMU
                    spec = VmSpec.model_validate(raw["spec"])
                    self.vms[spec.vm_id] = SimVm(spec, self.clock, raw["state"])

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
        if self.network is not None and self.network.hosts.get(self.host) is self:
            del self.network.hosts[self.host]

    async def create(self, spec: VmSpec) -> None:
        self.vms[spec.vm_id] = SimVm(spec, self.clock)
        self._save()

    async def destroy(self, vm_id: str) -> None:
        self.vms.pop(vm_id, None)
        self._save()

    def kill(self, vm_id: str) -> None:
        """The guest's process dies (a fault a test injects): it is gone, unsaved state too."""
        self.vms.pop(vm_id, None)
        self._save()

    def set_load(self, vm_id: str, *, cpu: float | None = None, memory_used_mib: float | None = None) -> None:
        """The load model: what ``vm_id`` uses from now on (kept in its params, ``sim_cpu`` and
        ``sim_memory_used_mib``, so it travels with the VM when it migrates)."""
        vm = self.vms[vm_id]
        params = dict(vm.spec.params)
        if cpu is not None:
            params["sim_cpu"] = float(cpu)
        if memory_used_mib is not None:
            params["sim_memory_used_mib"] = float(memory_used_mib)
        vm.spec = vm.spec.model_copy(update={"params": params})
        self._save()

    async def telemetry(self) -> HostLoad:
        """The host's load from its guests' load model (cores and MiB each VM uses)."""
        guests = []
        for vm in self.vms.values():
            if vm.state not in ("running", "paused"):
                continue
            p, spec = vm.spec.params, vm.spec
            cpu = float(p.get("sim_cpu", 0.0)) if vm.state == "running" else 0.0  # type: ignore[arg-type]
            mem = float(p.get("sim_memory_used_mib", spec.memory_mib))  # type: ignore[arg-type]
            guests.append(GuestLoad(vm_id=spec.vm_id, cpu=cpu, memory_used_mib=min(mem, spec.memory_mib),
                                    memory_mib=spec.memory_mib, vcpus=spec.vcpus))
        return HostLoad(host=self.host, at=self.clock.now(), cpus=self.cpus, memory_mib=self.capacity_mib,
                        cpu_used=sum(g.cpu for g in guests), memory_used_mib=sum(g.memory_used_mib for g in guests),
                        vms=guests)

    async def list(self) -> list[VmSpec]:
        return [vm.spec for vm in self.vms.values() if vm.state in ("running", "paused")]

    async def state(self, vm_id: str) -> VmState:
        vm = self.vms.get(vm_id)
        return vm.state if vm else "absent"

    async def guest_status(self, vm_id: str) -> GuestStatus:
        """The guest's status block (all zeros, not valid, for a guest that is not here)."""
        vm = self.vms.get(vm_id)
        return vm.status() if vm is not None else GuestStatus(0, 0, 0, 0)

    async def prepare_incoming(self, spec: VmSpec, params: MigrationParams) -> str:
        if spec.params.get("sim_fail") == "incoming":
            raise RuntimeError("simulated failure: target cannot start the incoming guest")
        current = self.vms.get(spec.vm_id)
        if current is None or current.state == "absent":
            self.vms[spec.vm_id] = SimVm(spec, self.clock, "inmigrate")
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
        if vm is not None and vm.state == "postmigrate" and vm.completed is not None:
            return vm.completed  # a replayed step: the guest was already sent
        if vm is None or vm.state != "running":
            return MigrationResult("failed", f"vm {vm_id} is not running here")
        vm.migrating, vm.migration_cancelled = True, False
        try:
            result = await self._precopy(vm, uri, params, on_progress)
            if result.outcome == "completed":
                vm.completed = result
                if vm.spec.params.get("sim_source_crash"):
                    # the source process dies right after the hypervisor finished: the only
                    # copy of the guest is the target's
                    self.vms.pop(vm.spec.vm_id, None)
            return result
        finally:
            vm.migrating = False
            self._save()

    def _broken(self, uri: str) -> bool:
        """Whether the stream to ``uri`` broke: its target guest is gone (or not receiving)."""
        if self.network is None:
            return False  # a target in another process: this simulation cannot see it
        reachable, incoming = self.network.incoming(uri)
        return reachable and (incoming is None or incoming.state != "inmigrate")

    async def _precopy(
        self, vm: SimVm, uri: str, params: MigrationParams, on_progress: ProgressCallback
    ) -> MigrationResult:
        p = vm.spec.params
        total = vm.spec.memory_mib * MIB
        started = self.clock.monotonic()
        if p.get("sim_instant"):
            await on_progress(MigrationProgress("completed", total, total, 0, 0, 1, 100.0))
            vm.state = "postmigrate"
            return MigrationResult("completed", stats=_stats(0.0, 0.0, total))
        bandwidth = float(params.bandwidth_mibps or p.get("sim_bandwidth_mibps", 1024)) * MIB
        dirty_rate, dirty_set = _dirtying(p, total)
        watch = PrecopyWatch(params, vm.spec.memory_mib, clock=self.clock.monotonic)
        ladder = Convergence(Ladder.of(params), clock=self.clock.monotonic)
        remaining, sent, passes = float(total), 0.0, 0
        while True:
            passes += 1
            pass_bytes = remaining
            pass_time = pass_bytes / bandwidth
            # sleep the pass in slices so cancel, a broken stream and timeouts are noticed
            # promptly, and report what is left at every one, as the real drivers' polls do
            elapsed = 0.0
            while elapsed < pass_time:
                step = min(params.poll_interval_s, pass_time - elapsed)
                await self.clock.sleep(step)
                elapsed += step
                took = self.clock.monotonic() - started
                if vm.migration_cancelled:
                    return MigrationResult("cancelled", "migration cancelled", _stats(took, 0, sent))
                if self._broken(uri):
                    return MigrationResult("failed", "migration stream broke: the target guest is gone", _stats(took, 0, sent))
                left = pass_bytes * max(0.0, 1 - elapsed / pass_time)
                watch.observe(int(left))
                why = watch.expired(stall=False)  # stalls climb the ladder (drivers/convergence.py)
                if why is not None:
                    return MigrationResult("failed", why, _stats(took, 0, sent))
                await on_progress(
                    MigrationProgress(
                        "active", total, int(sent + pass_bytes - left), int(left),
                        int(dirty_rate / PAGE), passes, watch.percent(total, int(left)),
                        rung=ladder.rung, downtime_limit_ms=ladder.downtime_ms,
                    )
                )
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
            remaining = min(dirty_set, dirty_rate * pass_time)  # redirtied while the pass went
            decision = ladder.observe(int(remaining), passes)  # once a pass, as QEMU's sync count
            if decision.action == "abort":
                return MigrationResult("failed", decision.reason, _stats(self.clock.monotonic() - started, 0, sent))
            if decision.action == "postcopy":
                return await self._postcopy(vm, uri, params, on_progress, ladder, total, sent, remaining, started)
            if remaining / bandwidth * 1000 <= ladder.downtime_ms:
                downtime = remaining / bandwidth
                await self.clock.sleep(downtime)
                sent += remaining
                vm.state = "postmigrate"
                await on_progress(MigrationProgress("completed", total, int(sent), 0, 0, passes + 1, 100.0,
                                                    rung=ladder.rung, downtime_limit_ms=ladder.downtime_ms))
                return MigrationResult("completed", stats=_stats(self.clock.monotonic() - started, downtime, sent))

    async def _postcopy(self, vm: SimVm, uri: str, params: MigrationParams, on_progress: ProgressCallback,
                        ladder: Convergence, total: int, sent: float, remaining: float,
                        started: float) -> MigrationResult:
        """The guest runs on the target from now on; what is left comes over on demand. A
        stream that breaks now leaves it runnable nowhere: failed, never resumed here."""
        ladder.postcopy_started = True
        vm.state = "paused"
        bandwidth = float(params.postcopy_bandwidth_mibps or params.bandwidth_mibps
                          or vm.spec.params.get("sim_bandwidth_mibps", 1024)) * MIB  # type: ignore[arg-type]
        left = remaining
        while left > 0:
            await on_progress(MigrationProgress(
                "postcopy-active", total, int(sent + remaining - left), int(left), 0, ladder.rung + 1,
                PrecopyWatch.percent(total, int(left)), rung=ladder.rung, downtime_limit_ms=ladder.downtime_ms,
                postcopy=True))
            step = min(params.poll_interval_s, left / bandwidth)
            await self.clock.sleep(step)
            left -= step * bandwidth
            if self._broken(uri):
                return MigrationResult("failed", "post-copy stream broke: the target guest is gone",
                                       _stats(self.clock.monotonic() - started, 0, sent), postcopy_started=True)
        vm.state = "postmigrate"
        await on_progress(MigrationProgress("completed", total, int(sent + remaining), 0, 0, ladder.rung + 1, 100.0,
                                            rung=ladder.rung, downtime_limit_ms=ladder.downtime_ms, postcopy=True))
        return MigrationResult("completed", stats=_stats(self.clock.monotonic() - started, 0, sent + remaining),
                               postcopy_started=True)

    async def cancel_migration(self, vm_id: str) -> None:
        vm = self.vms.get(vm_id)
        if vm is None:
            return
        if vm.migrating:
            vm.migration_cancelled = True
        if vm.state == "postmigrate":
            # cancelled after the switch-over point in the hypervisor: resume the source
            vm.state = "running"
            vm.completed = None
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


def _dirtying(params: dict[str, object], total: int) -> tuple[float, float]:
    """(bytes/s the guest redirties, bytes it rewrites at most): ``sim_dirty_mibps`` over all
    of memory, else the test guest's ``guest_dirty_mib`` at ``guest_rate_mibps`` (0: flat out)."""
    if params.get("sim_dirty_mibps"):
        return float(params["sim_dirty_mibps"]) * MIB, float(total)  # type: ignore[arg-type]
    working = min(float(params.get("guest_dirty_mib", 0)) * MIB, float(total))  # type: ignore[arg-type]
    if working <= 0:
        return 0.0, 0.0
    rate = float(params.get("guest_rate_mibps", 0)) or FLAT_OUT_MIBPS  # type: ignore[arg-type]
    return rate * MIB, working


def _stats(total_s: float, downtime_s: float, sent: float) -> dict[str, float]:
    return {
        "total_time_ms": round(total_s * 1000, 3),
        "downtime_ms": round(downtime_s * 1000, 3),
        "setup_time_ms": 0.0,
        "transferred_bytes": int(sent),
    }
