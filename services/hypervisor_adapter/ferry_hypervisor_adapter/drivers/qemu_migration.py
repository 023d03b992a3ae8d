"""Migration out of a QEMU guest over QMP: parameters, following its status up the
convergence ladder to completion, post-copy or a cancel, and the source's teardown."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ferry_common.messages.domain import VmSpec

from .base import MigrationParams, MigrationResult, ProgressCallback
from .convergence import Convergence, Decision, FigureKeys, Ladder
from .precopy import PrecopyWatch
from .qemu_files import TLS_OUT
from .qemu_qmp import QmpMixin, QmpUnavailable

log = logging.getLogger("ferry_hypervisor_adapter.drivers.qemu")

MIB = 1024 * 1024
# QEMU 7.2's own default for max-bandwidth; set explicitly so a previous cap does not linger
QEMU_DEFAULT_BANDWIDTH = 128 * MIB
# post-copy's states: the guest runs on the target from the first of them on
_POSTCOPY = {"postcopy-active", "postcopy-paused", "postcopy-recover"}
_ACTIVE = {"setup", "active", "pre-switchover", "device", "wait-unplug", "cancelling", *_POSTCOPY}


class MigrationMixin(QmpMixin):
    """The source side of :class:`~.qemu.QemuDriver`'s migrations."""

    tls_dir: Path | None
    _cancel_requested: set[str]
    # guests whose migration away this driver saw complete, by the pid of the process left
    # in postmigrate: its teardown needs no status query first
    _handed_over: dict[str, int | None]
    _postcopied: set[str]  # guests whose last migration away went through post-copy

    if TYPE_CHECKING:  # the driver's processes (.qemu)

        def _lock(self, vm_id: str) -> asyncio.Lock: ...
        def _meta(self, vm_id: str) -> dict[str, Any] | None: ...
        def _pid(self, vm_id: str) -> int | None: ...
        async def _kill(self, vm_id: str) -> None: ...

    async def migrate(
        self, vm_id: str, uri: str, params: MigrationParams, on_progress: ProgressCallback
    ) -> MigrationResult:
        meta = self._meta(vm_id)
        if not meta or meta["role"] != "guest" or not self._alive(vm_id):
            return MigrationResult("failed", f"vm {vm_id} is not running on {self.host}")
        spec = VmSpec.model_validate(meta["spec"])
        try:
            # QMP answers commands in the order they came, each by its id: independent ones go
            # out together, one round trip to the monitor instead of one each
            info, run = await asyncio.gather(self._qmp(vm_id, "query-migrate"), self._qmp(vm_id, "query-status"))
            status = run["status"]
            if info.get("status") == "completed" and status == "postmigrate":
                result = MigrationResult("completed", stats=_stats(info))  # a replayed call
            else:
                if info.get("status") not in _ACTIVE:  # otherwise attach to the running one
                    if status != "running":
                        return MigrationResult("failed", f"vm {vm_id} is {status}, not running")
                    await self._set_params(vm_id, params)
                    self._cancel_requested.discard(vm_id)
                    self._postcopied.discard(vm_id)
                    await self._qmp(vm_id, "migrate", {"uri": uri})
                result = await self._watch(vm_id, spec, params, on_progress)
            if result.outcome == "completed":
                self._handed_over[vm_id] = self._pid(vm_id)
            if result.postcopy_started:
                self._postcopied.add(vm_id)
            return result
        except QmpUnavailable as exc:
            return MigrationResult("failed", f"source QEMU gone: {exc}")

    async def _set_params(self, vm_id: str, params: MigrationParams) -> None:
        # "events": QEMU announces each change of the migration's status (MIGRATION), so
        # the end is seen at once instead of at the next poll
        bandwidth = (
            params.bandwidth_mibps * MIB if params.bandwidth_mibps else QEMU_DEFAULT_BANDWIDTH
        )
        settings: dict[str, Any] = {"downtime-limit": params.downtime_limit_ms, "max-bandwidth": bandwidth,
                                    "max-postcopy-bandwidth": params.postcopy_bandwidth_mibps * MIB}
        if self.tls_dir is not None:
            # the target's certificate is checked against the host of the URI it listens on;
            # a process started before TLS was configured has no such credentials and fails
            # here, so its migration rolls back instead of going out in clear
            settings["tls-creds"] = TLS_OUT
        await asyncio.gather(
            self._qmp(
                vm_id,
                "migrate-set-capabilities",
                # return-path: the source's "completed" waits for the target to say it loaded the
                # guest, so a target that refused the stream (TLS) is a failure, not a handover
                {"capabilities": [{"capability": "auto-converge", "state": params.auto_converge},
                                  {"capability": "events", "state": True},
                                  {"capability": "return-path", "state": True},
                                  {"capability": "postcopy-ram", "state": params.postcopy == "allow"}]},
            ),
            self._qmp(vm_id, "migrate-set-parameters", settings),
        )

    async def _watch(
        self, vm_id: str, spec: VmSpec, params: MigrationParams, on_progress: ProgressCallback
    ) -> MigrationResult:
        async with self._events(vm_id, ("MIGRATION",)) as changed:
            return await self._follow(vm_id, spec, params, on_progress, changed)

    async def _follow(
        self,
        vm_id: str,
        spec: VmSpec,
        params: MigrationParams,
        on_progress: ProgressCallback,
        changed: Callable[[float], Awaitable[None]],
    ) -> MigrationResult:
        watch = PrecopyWatch(params, spec.memory_mib)
        ladder = Convergence(Ladder.of(params))
        last: dict[str, Any] = {}  # the last sample with figures: a cancelled migration has none
        while True:
            info = await self._qmp(vm_id, "query-migrate")
            status = info.get("status", "none")
            ram = info.get("ram", {})
            if ram:
                last = info
            ladder.postcopy_started |= status in _POSTCOPY
            postcopy = ladder.postcopy_started
            if status == "completed":
                # a post-copy asked for may have started and ended between two polls: its source
                # is then stale, so an unseen one counts as started (never resumed)
                ladder.postcopy_started = postcopy = postcopy or ladder.postcopy_requested
                info = await self._totalled(vm_id, info)
                await on_progress(ladder.sample(status, info.get("ram", ram), RAM_KEYS, done=True))
                return MigrationResult("completed", stats=_stats(info), postcopy_started=postcopy)
            if status in ("failed", "postcopy-paused"):
                # post-copy that loses its stream pauses both halves rather than failing: the
                # guest can run nowhere until a recovery this driver does not attempt
                reason = info.get("error-desc", f"migration {status}")
                return MigrationResult("failed", reason, _stats(info, last), postcopy_started=postcopy)
            if status == "cancelled":
                self._cancel_requested.discard(vm_id)
                return MigrationResult("cancelled", "migration cancelled", _stats(info, last))
            if status == "none":
                return MigrationResult("failed", "no migration is running")
            if status in ("active", "postcopy-active") and ram:
                sample = ladder.sample(status, ram, RAM_KEYS)
                await on_progress(sample)
                if status == "active":
                    watch.observe(sample.remaining_bytes)
                    if vm_id not in self._cancel_requested:
                        await self._climb(vm_id, ladder, ladder.observe(sample.remaining_bytes, sample.passes))
            # past the start of post-copy nothing may cancel: the source no longer holds the guest
            reason = None
            if vm_id not in self._cancel_requested and not ladder.past_cancel:
                reason = watch.expired(stall=False) or ladder.reason or None
            if reason:
                log.info("vm %s: %s, cancelling the migration", vm_id, reason)
                end = await self._cancel_and_wait(vm_id)
                if end.get("status") == "completed":  # it made it before the cancel
                    return MigrationResult("completed", stats=_stats(end))
                return MigrationResult("failed", reason, _stats(end, last))
            await changed(params.poll_interval_s)

    async def _climb(self, vm_id: str, ladder: Convergence, decision: Decision) -> None:
        """Carry out a convergence decision: a higher downtime, or post-copy."""
        if decision.action == "raise":
            log.info("vm %s: %s", vm_id, decision.reason)
            await self._qmp(vm_id, "migrate-set-parameters", {"downtime-limit": decision.downtime_ms})
        elif decision.action == "postcopy":
            from qemu.qmp import ExecuteError

            log.info("vm %s: %s", vm_id, decision.reason)
            try:
                await self._qmp(vm_id, "migrate-start-postcopy")
            except ExecuteError as exc:  # e.g. the target cannot take post-copy: pre-copy goes on
                ladder.refuse_postcopy(f"stall timeout at the top rung, and post-copy could not start: {exc}")

    async def _totalled(self, vm_id: str, info: dict[str, Any]) -> dict[str, Any]:
        """``query-migrate`` once QEMU has totalled the figures: its MIGRATION event says
        completed a moment before (total time still 0), and the event wakes us that early."""
        for _ in range(100):
            if info.get("total-time"):
                break
            await asyncio.sleep(0.001)
            info = await self._qmp(vm_id, "query-migrate")
        return info

    async def _cancel_and_wait(self, vm_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
        await self._qmp(vm_id, "migrate_cancel")
        deadline = time.monotonic() + timeout_s
        while True:
            info: dict[str, Any] = await self._qmp(vm_id, "query-migrate")
            if info.get("status") not in _ACTIVE or time.monotonic() > deadline:
                return info
            await asyncio.sleep(0.02)

    async def cancel_migration(self, vm_id: str) -> None:
        if not self._meta(vm_id) or not self._alive(vm_id):
            return
        try:
            info = await self._qmp(vm_id, "query-migrate")
            if info.get("status") in _POSTCOPY:
                log.warning("vm %s: post-copy started, the migration cannot be cancelled", vm_id)
                return
            if info.get("status") in _ACTIVE:
                self._cancel_requested.add(vm_id)
                await self._qmp(vm_id, "migrate_cancel")
            elif vm_id in self._postcopied:
                log.warning("vm %s: its migration went through post-copy, the source is not resumed", vm_id)
            elif (await self._qmp(vm_id, "query-status"))["status"] == "postmigrate":
                # cancelled after the switch-over: the source still holds the guest's state and
                # resumes it; the saga aborts the target's copy (abort_incoming) alongside
                self._handed_over.pop(vm_id, None)
                await self._qmp(vm_id, "cont")
        except QmpUnavailable:
            return

    async def confirm_source(self, vm_id: str) -> None:
        async with self._lock(vm_id):
            meta = self._meta(vm_id)
            handed_over = self._handed_over.pop(vm_id, None)
            if not meta:
                return
            if handed_over is not None and handed_over == self._pid(vm_id):
                # the process this driver saw hand its guest over, not resumed since: no need to
                # ask it what it runs (a guest started here again is another process)
                await self._kill(vm_id)
                return
            status = await self._status_or_none(vm_id)
            if status is None or status in ("postmigrate", "paused"):
                await self._kill(vm_id)
            else:
                log.warning("confirm_source(%s): guest is %s here, left alone", vm_id, status)


# QEMU's names for a sample's figures in ``query-migrate``'s ``ram``
RAM_KEYS = FigureKeys("total", "transferred", "remaining", "dirty-pages-rate", "dirty-sync-count")


def _stats(info: dict[str, Any], last: dict[str, Any] | None = None) -> dict[str, Any]:
    """Final figures from ``query-migrate``; ``last`` fills in what an ended migration drops."""
    if "ram" not in info and last:
        info = {**last, **info}
    ram = info.get("ram", {})
    stats: dict[str, Any] = {"transferred_bytes": int(ram.get("transferred", 0))}
    for key, name in (
        ("total-time", "total_time_ms"),
        ("downtime", "downtime_ms"),
        ("setup-time", "setup_time_ms"),
    ):
        if key in info:
            stats[name] = float(info[key])
    if "dirty-sync-count" in ram:
        stats["passes"] = int(ram["dirty-sync-count"])
    return stats
