"""The libvirt driver's source side of a migration: ``migrateToURI3`` peer-to-peer, followed
up the convergence ladder to completion, post-copy or an abort, and the source's teardown.

A mixin of :class:`~.libvirt.LibvirtDriver`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ferry_common.messages.domain import VmSpec

from . import libvirt_storage
from .base import MigrationParams, MigrationProgress, MigrationResult, ProgressCallback, VmState
from .convergence import Convergence, Decision, FigureKeys, Ladder
from .libvirt_calls import (
    _JOB_NONE,
    _PAUSED,
    _PAUSED_POSTCOPY,
    _PAUSED_POSTCOPY_FAILED,
    _QUERY_TIMEOUT_S,
    _UNLIMITED,
    _blocking,
    _lv,
    decode_uri,
    domain_name,
)
from .precopy import PrecopyWatch

log = logging.getLogger("ferry_hypervisor_adapter.drivers.libvirt")


class MigrationSource:
    """The source side of :class:`~.libvirt.LibvirtDriver`'s migrations."""

    host: str
    tls: bool
    migration_host: str
    abort_grace_s: float
    _cancel_requested: set[str]
    _aborts: dict[str, asyncio.Task[bool]]  # vm_id -> an operator's cancel under way
    _postcopy: set[str]  # outgoing migrations in post-copy: not to be cancelled

    if TYPE_CHECKING:  # the driver's domains (.libvirt)

        async def _lookup(self, vm_id: str) -> Any: ...
        def _spec_of(self, dom: Any) -> VmSpec | None: ...
        async def state(self, vm_id: str) -> VmState: ...
        async def destroy(self, vm_id: str) -> None: ...

    async def migrate(
        self, vm_id: str, uri: str, params: MigrationParams, on_progress: ProgressCallback
    ) -> MigrationResult:
        lv = _lv()
        dconnuri, miguri = decode_uri(uri)
        dom = await self._lookup(vm_id)
        if dom is None or not await _blocking(dom.isActive):
            # a replayed call after success: the guest runs on the target, not here (a
            # persistent source stays defined, shut off, until the saga's teardown)
            if await _runs_at(dconnuri, vm_id):
                return MigrationResult(
                    "completed", stats=await _completed_stats(dconnuri, vm_id, {})
                )
            return MigrationResult("failed", f"vm {vm_id} is not on {self.host}")
        if await self.state(vm_id) != "running":
            return MigrationResult("failed", f"vm {vm_id} is not running on {self.host}")
        spec = await _blocking(self._spec_of, dom)
        memory_mib = spec.memory_mib if spec else (await _blocking(dom.maxMemory)) // 1024

        await _blocking(dom.migrateSetMaxDowntime, params.downtime_limit_ms, 0)
        flags = lv.VIR_MIGRATE_LIVE | lv.VIR_MIGRATE_PEER2PEER
        if params.auto_converge:
            flags |= lv.VIR_MIGRATE_AUTO_CONVERGE
        if params.postcopy == "allow":
            flags |= lv.VIR_MIGRATE_POSTCOPY  # allowed only: started by migrateStartPostCopy
        if self.tls:
            # both daemons set up QEMU's TLS credentials from their migrate_tls_x509_cert_dir,
            # and the source checks the target's certificate against the migration URI's host
            flags |= lv.VIR_MIGRATE_TLS
        call = {
            lv.VIR_MIGRATE_PARAM_URI: miguri,
            lv.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: urlsplit(miguri).hostname or self.migration_host,
            lv.VIR_MIGRATE_PARAM_BANDWIDTH: params.bandwidth_mibps or _UNLIMITED,
        }
        if spec is not None and spec.params.get("adopted"):  # persistent, disks by storage mode
            more_flags, more = libvirt_storage.migration_options(spec.params, await _blocking(dom.isPersistent))
            flags |= more_flags
            call.update(more)
        if params.postcopy == "allow" and params.postcopy_bandwidth_mibps:
            call[lv.VIR_MIGRATE_PARAM_BANDWIDTH_POSTCOPY] = params.postcopy_bandwidth_mibps
        self._cancel_requested.discard(vm_id)
        watch = PrecopyWatch(params, memory_mib)
        ladder = Convergence(Ladder.of(params))
        self._postcopy.discard(vm_id)
        job = asyncio.create_task(_blocking(dom.migrateToURI3, dconnuri, call, flags))
        last: dict[str, Any] = {}
        reason: str | None = None
        abort: asyncio.Task[bool] | None = None
        try:
            while not job.done():
                stats = await _job_stats(dom)
                if ladder.postcopy_requested and not ladder.postcopy_started:
                    ladder.postcopy_started = await _in_postcopy(dom)
                if stats and (stats.get("memory_total") or stats.get("disk_total")):
                    last = stats
                    sample = _progress("active", stats, ladder)
                    await on_progress(sample)
                    watch.observe(*_watched(sample))
                    if reason is None and vm_id not in self._cancel_requested and not job.done():
                        await self._climb(vm_id, dom, ladder, ladder.observe(sample.remaining_bytes, sample.passes))
                # past the start of post-copy nothing may cancel: the source no longer holds the guest
                if reason is None and vm_id not in self._cancel_requested and not ladder.past_cancel:
                    reason = watch.expired(stall=False) or ladder.reason or None
                    if reason:
                        log.info("vm %s: %s, aborting the migration job", vm_id, reason)
                        abort = asyncio.create_task(self._abort(vm_id, dom))
                if abort is None and vm_id in self._cancel_requested:
                    abort = self._aborts.get(vm_id)  # the operator's cancel
                if abort is not None and abort.done() and abort.exception() is None and not abort.result() \
                        and not job.done():
                    # the job outlived every way of stopping it: report the failure, and the
                    # saga's clean-up of the target ends the stream (the source keeps running)
                    why = reason or "migration cancelled"
                    return MigrationResult("failed", f"{why}; the migration job did not stop", _stats(last))
                await asyncio.wait({job}, timeout=params.poll_interval_s)
        finally:
            if abort is not None:
                abort.cancel()
            self._aborts.pop(vm_id, None)
        if ladder.postcopy_requested and not ladder.postcopy_started:
            # a failed job: did it get to post-copy (the source is left paused for it)? A
            # completed one whose start went unseen counts as started: its source is gone anyway
            ladder.postcopy_started = job.exception() is None or await _in_postcopy(dom)
        postcopy = ladder.postcopy_started
        try:
            job.result()
        except lv.libvirtError as exc:
            if vm_id in self._cancel_requested and not postcopy:
                self._cancel_requested.discard(vm_id)
                return MigrationResult("cancelled", "migration cancelled", _stats(last))
            return MigrationResult("failed", reason or str(exc), _stats(last), postcopy_started=postcopy)
        finally:
            self._postcopy.discard(vm_id)
        stats = await _completed_stats(dconnuri, vm_id, last)
        stats.setdefault("total_time_ms", round((time.monotonic() - watch.started) * 1000, 3))
        # a fast migration may end before the first sample: take the final figures instead
        await on_progress(
            MigrationProgress(
                "completed",
                total_bytes=int(last.get("memory_total") or stats.get("transferred_bytes", 0)),
                transferred_bytes=int(stats.get("transferred_bytes") or last.get("memory_processed", 0)),
                remaining_bytes=0,
                passes=int(stats.get("passes") or last.get("memory_iteration", 0)),
                percent=100.0,
                disk_total_bytes=int(last.get("disk_total", 0)),
                disk_transferred_bytes=int(stats.get("disk_transferred_bytes") or last.get("disk_processed", 0)),
                rung=ladder.rung,
                downtime_limit_ms=ladder.downtime_ms,
                postcopy=postcopy,
            )
        )
        return MigrationResult("completed", stats=stats, postcopy_started=postcopy)

    async def _climb(self, vm_id: str, dom: Any, ladder: Convergence, decision: Decision) -> None:
        """Carry out a convergence decision: a higher downtime, or post-copy."""
        if decision.action not in ("raise", "postcopy"):
            return
        log.info("vm %s: %s", vm_id, decision.reason)
        try:
            if decision.action == "raise":
                await asyncio.wait_for(_blocking(dom.migrateSetMaxDowntime, decision.downtime_ms, 0), _QUERY_TIMEOUT_S)
            else:
                self._postcopy.add(vm_id)  # before the call: a cancel racing it must not go through
                await _blocking(dom.migrateStartPostCopy, 0)
        except (_lv().libvirtError, TimeoutError) as exc:
            if decision.action == "postcopy":
                self._postcopy.discard(vm_id)
                ladder.refuse_postcopy(f"stall timeout at the top rung, and post-copy could not start: {exc}")
            else:
                log.warning("vm %s: downtime not raised: %s", vm_id, exc)

    async def cancel_migration(self, vm_id: str) -> None:
        if vm_id in self._postcopy:
            log.warning("vm %s: post-copy started, the migration cannot be cancelled", vm_id)
            return
        dom = await self._lookup(vm_id)
        if dom is None:
            return  # gone: either never here or already migrated (nothing left to resume)
        if _job_running(await _job_stats(dom)):
            self._cancel_requested.add(vm_id)
            if vm_id not in self._aborts or self._aborts[vm_id].done():
                self._aborts[vm_id] = asyncio.create_task(self._abort(vm_id, dom))

    async def _abort(self, vm_id: str, dom: Any) -> bool:
        """Stop the domain's migration job, escalating; True once it stopped, False if it
        still runs after four grace periods.

        ``abortJob`` was seen here (TCG, a loaded host) to block for minutes while the job
        went on, and a second abort to stop it at once; so no call is awaited without a
        bound, and while the job runs QEMU's own ``migrate_cancel`` and ``abortJob`` take
        turns. The job's figures may not come either while the monitor is held (CI saw a
        saga wait past a minute on them): an unanswered query counts as a job still running."""
        lv = _lv()

        async def bounded(fn: Any, *args: Any, bound: float = self.abort_grace_s) -> None:
            with contextlib.suppress(lv.libvirtError, TimeoutError):
                await asyncio.wait_for(_blocking(fn, *args), bound)

        def migrate_cancel(d: Any) -> None:
            import libvirt_qemu

            libvirt_qemu.qemuMonitorCommand(d, '{"execute":"migrate_cancel"}', 0)

        def abort_job(d: Any) -> None:
            d.abortJob()

        first = asyncio.create_task(bounded(dom.abortJob))
        try:
            for attempt in range(4):
                await asyncio.sleep(self.abort_grace_s)
                if not _job_running(await _job_stats(dom)):
                    return True
                log.warning("vm %s: migration job still running %.0fs after the abort; trying again",
                            vm_id, (attempt + 1) * self.abort_grace_s)
                # waited for briefly: a stuck call keeps its thread, not this loop
                await bounded(migrate_cancel if attempt % 2 == 0 else abort_job, dom, bound=_QUERY_TIMEOUT_S)
        finally:
            first.cancel()
        return not _job_running(await _job_stats(dom))

    async def confirm_source(self, vm_id: str) -> None:
        state = await self.state(vm_id)
        if state == "absent":
            return  # the usual case: p2p ends a transient source domain itself
        if state in ("postmigrate", "paused", "shutoff"):
            await self.destroy(vm_id)
        else:
            log.warning("confirm_source(%s): guest is %s here, left alone", vm_id, state)


async def _job_stats(dom: Any) -> dict[str, Any] | None:
    """The domain's job figures; ``{}`` once the domain left (the migration finished between
    two polls), None if libvirt did not answer within ``_QUERY_TIMEOUT_S`` (the query waits
    for the domain's monitor, which a stuck abort or a busy QEMU can hold for minutes)."""
    try:
        return dict(await asyncio.wait_for(_blocking(dom.jobStats), _QUERY_TIMEOUT_S))
    except _lv().libvirtError:
        return {}
    except TimeoutError:
        return None


async def _in_postcopy(dom: Any) -> bool:
    """Whether the source domain is in post-copy (paused for it, or after it failed)."""
    try:
        state, reason = await asyncio.wait_for(_blocking(dom.state), _QUERY_TIMEOUT_S)
    except (_lv().libvirtError, TimeoutError):
        return False
    return bool(state == _PAUSED and reason in (_PAUSED_POSTCOPY, _PAUSED_POSTCOPY_FAILED))


def _job_running(stats: dict[str, Any] | None) -> bool:
    """Whether a migration job may still run: an unanswered query counts as yes."""
    return stats is None or stats.get("type", _JOB_NONE) != _JOB_NONE


async def _runs_at(dconnuri: str, vm_id: str) -> bool:
    def check() -> bool:
        lv = _lv()
        conn = lv.open(dconnuri)
        try:
            return bool(conn.lookupByName(domain_name(vm_id)).isActive())
        except lv.libvirtError:
            return False
        finally:
            conn.close()

    return await _blocking(check)


async def _completed_stats(dconnuri: str, vm_id: str, last: dict[str, Any]) -> dict[str, Any]:
    """The finished job's figures: p2p removes the source domain, the target keeps them."""

    def fetch() -> dict[str, Any]:
        lv = _lv()
        try:
            conn = lv.open(dconnuri)
        except lv.libvirtError:
            return {}
        try:
            dom = conn.lookupByName(domain_name(vm_id))
            return dict(dom.jobStats(lv.VIR_DOMAIN_JOB_STATS_COMPLETED))
        except lv.libvirtError:
            return {}
        finally:
            conn.close()

    done = await _blocking(fetch)
    if not done:
        return _stats(last)
    # after post-copy the target's record of the job may lack the memory figures: the last
    # sample's fill them in (never its downtime, which is the limit, not a measure)
    return _stats({**{k: v for k, v in last.items() if k != "downtime"}, **done}, completed=True)


# libvirt's names for a sample's memory figures in a job's stats
MEMORY_KEYS = FigureKeys("memory_total", "memory_processed", "memory_remaining", "memory_dirty_rate", "memory_iteration")


def _progress(status: str, stats: dict[str, Any], ladder: Convergence) -> MigrationProgress:
    """A sample of memory's figures and the disk copy's (libvirt copies disks first)."""
    return ladder.sample(
        status,
        stats,
        MEMORY_KEYS,
        disk_total_bytes=int(stats.get("disk_total", 0)),
        disk_transferred_bytes=int(stats.get("disk_processed", 0)),
        disk_remaining_bytes=int(stats.get("disk_remaining", 0)),
    )


def _watched(sample: MigrationProgress) -> tuple[int, str]:
    """What the stall watch follows: the disk copy's remaining bytes until memory is being
    sent (libvirt copies disks first), then memory's."""
    if sample.total_bytes == 0 and sample.disk_total_bytes:
        return sample.disk_remaining_bytes, "disk"
    return sample.remaining_bytes, "memory"


def _stats(job: dict[str, Any], completed: bool = False) -> dict[str, Any]:
    """Figures of a job; only a completed job's ``downtime`` is measured (before: the limit)."""
    stats: dict[str, Any] = {"transferred_bytes": int(job.get("memory_processed", 0))}
    for key, name in (
        ("time_elapsed", "total_time_ms"),
        ("downtime", "downtime_ms"),
        ("setup_time", "setup_time_ms"),
    ):
        if key in job and (completed or key != "downtime"):
            stats[name] = float(job[key])
    if "memory_iteration" in job:
        stats["passes"] = int(job["memory_iteration"])
    if job.get("disk_total"):
        stats["disk_transferred_bytes"] = int(job.get("disk_processed", 0))
    return stats
