"""libvirt: guests are transient domains of one libvirt daemon per host, migrated peer-to-peer.

In peer-to-peer mode the source daemon connects to the target daemon and drives every phase
itself, so the target side has little to do up front: :meth:`LibvirtDriver.prepare_incoming`
checks the guest does not already run here, picks a free TCP port for the migration stream
and returns a URI that encodes both what the source needs::

    ferry-libvirt:?dconnuri=<target daemon URI, as the source daemon reaches it>&miguri=tcp://127.0.0.1:PORT

The source passes ``dconnuri`` to ``migrateToURI3`` and ``miguri`` as the migration URI, with
the listen address pinned to the host of ``miguri`` (otherwise QEMU on the target listens on
every interface). On the target the incoming domain appears only once the stream starts.

A completed peer-to-peer migration ends the source domain: unlike QEMU, there is no paused
copy to resume, so a cancel after completion does nothing and recovery can only go forward.

libvirt calls block, so each runs in a worker thread; ``libvirt`` is imported lazily.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, urlsplit
from xml.sax.saxutils import escape

from ferry_common.clock import SystemClock
from ferry_common.messages.domain import VmSpec
from ferry_common.messages.host_events import HostLoad

from . import libvirt_domains, libvirt_storage, telemetry
from .base import MigrationParams, MigrationProgress, MigrationResult, ProgressCallback, VmState
from .convergence import Convergence, Decision, Ladder
from .guest import STATUS_ADDR, GuestStatus, default_guest_image, guest_cmdline
from .libvirt_adopted import AdoptedDomains
from .libvirt_domains import METADATA_NS
from .precopy import PrecopyWatch

log = logging.getLogger(__name__)

MIB = 1024 * 1024
URI_SCHEME = "ferry-libvirt"
# libvirt's default bandwidth for QEMU is effectively unlimited; a cap of 0 keeps that
_UNLIMITED = 0

# libvirt constants, copied so that this module imports without libvirt installed
_RUNNING, _PAUSED, _SHUTDOWN, _SHUTOFF, _CRASHED, _PMSUSPENDED = 1, 3, 4, 5, 6, 7
_PAUSED_MIGRATION, _PAUSED_STARTING_UP, _PAUSED_POSTCOPY, _PAUSED_POSTCOPY_FAILED = 2, 11, 12, 13
_JOB_NONE = 0
_OP_MIGRATION_IN = 4
# how long a poll of the migration job may take before it counts as no answer
_QUERY_TIMEOUT_S = 1.0

T = TypeVar("T")


def _lv() -> Any:
    import libvirt  # lazy: only this driver needs the bindings

    return libvirt


# libvirt calls block a thread each; a stuck one (an abort under load, a query waiting for the
# domain's monitor) keeps its thread until libvirt lets go. They get threads of their own, so a
# few stuck calls cannot use up the process's default executor and stall everything else
_THREADS = ThreadPoolExecutor(max_workers=32, thread_name_prefix="ferry-libvirt")


async def _blocking(fn: Callable[..., T], *args: Any) -> T:
    """Run the blocking libvirt call ``fn(*args)`` on the driver's threads."""
    return await asyncio.get_running_loop().run_in_executor(_THREADS, functools.partial(fn, *args))


def encode_uri(dconnuri: str, miguri: str) -> str:
    """The URI :meth:`LibvirtDriver.prepare_incoming` hands to the source."""
    return f"{URI_SCHEME}:?dconnuri={quote(dconnuri, safe='')}&miguri={quote(miguri, safe='')}"


def decode_uri(uri: str) -> tuple[str, str]:
    """``(dconnuri, miguri)`` from :func:`encode_uri`'s output."""
    parts = urlsplit(uri)
    query = parse_qs(parts.query)
    if parts.scheme != URI_SCHEME or "dconnuri" not in query or "miguri" not in query:
        raise ValueError(f"not a {URI_SCHEME} URI: {uri!r}")
    return query["dconnuri"][0], query["miguri"][0]


def domain_name(vm_id: str) -> str:
    """libvirt forbids '/' in names; other characters of a Ferry name are fine."""
    return vm_id.replace("/", "_")


class LibvirtDriver(AdoptedDomains):
    """The :class:`~.base.Driver` protocol over a libvirt daemon.

    Options: ``uri`` (this host's daemon, e.g. ``qemu:///system`` or
    ``qemu+unix:///system?socket=...``), ``peer_uri`` (how *other* hosts' daemons reach this
    one, for peer-to-peer migration; default ``uri``), ``migration_host`` (address the
    incoming QEMU listens on, ``127.0.0.1``), ``run_dir`` (marker files of incoming guests,
    default ``/tmp/ferry-libvirt-driver/<host>``), ``guest_image`` (the ``-kernel`` ELF; must
    exist at the same path on every host), ``emulator``, ``machine`` (``pc``),
    ``domain_type`` (``qemu`` = TCG; ``kvm`` where available), ``finish_timeout_s``,
    ``abort_grace_s`` (how long an aborted migration job may keep running before QEMU is told
    to cancel directly, and again; after four times that the migration is reported failed and
    the saga's clean-up of the target ends the stream), ``tls`` (migrate with
    ``VIR_MIGRATE_TLS``: the stream over mutual TLS with the daemons' own certificates,
    ``migrate_tls_x509_cert_dir`` in their qemu.conf; off by default).
    """

    name = "libvirt"
    can_resume_source_after_completion = False

    def __init__(
        self,
        host: str,
        *,
        uri: str = "qemu:///system",
        peer_uri: str | None = None,
        migration_host: str = "127.0.0.1",
        run_dir: str | os.PathLike[str] | None = None,
        guest_image: str | os.PathLike[str] | None = None,
        emulator: str = "/usr/bin/qemu-system-x86_64",
        machine: str = "pc",
        domain_type: str = "qemu",
        finish_timeout_s: float = 10.0,
        abort_grace_s: float = 5.0,
        tls: bool = False,
    ) -> None:
        self.host = host
        self.tls = tls
        self.uri = uri
        self.peer_uri = peer_uri or uri
        self.migration_host = migration_host
        safe_host = re.sub(r"[^A-Za-z0-9._-]", "_", host)
        self.run_dir = Path(run_dir) if run_dir else Path("/tmp/ferry-libvirt-driver") / safe_host
        self._guest_image = Path(guest_image) if guest_image else None
        self.emulator = emulator
        self.machine = machine
        self.domain_type = domain_type
        self.finish_timeout_s = finish_timeout_s
        self.abort_grace_s = abort_grace_s
        self._conn: Any = None
        self._meter = telemetry.CpuMeter(SystemClock())  # CPU rates for telemetry()
        self._cancel_requested: set[str] = set()
        self._aborts: dict[str, asyncio.Task[bool]] = {}  # vm_id -> an operator's cancel under way
        self._postcopy: set[str] = set()  # outgoing migrations in post-copy: not to be cancelled

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        lv = _lv()
        # libvirt prints every error to stderr by default; they reach us as exceptions anyway
        lv.registerErrorHandler(lambda _ctx, _err: None, None)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._conn = await _blocking(lv.open, self.uri)
        if self._guest_image is None:
            self._guest_image = await _blocking(default_guest_image)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):
                await _blocking(conn.close)

    async def create(self, spec: VmSpec) -> None:
        dom = await self._lookup(spec.vm_id)
        if dom is not None and await _blocking(dom.isActive):
            return
        await _blocking(self._connection().createXML, self._domain_xml(spec), 0)

    async def destroy(self, vm_id: str) -> None:
        self._marker(vm_id).unlink(missing_ok=True)
        dom = await self._lookup(vm_id)
        if dom is None:
            return
        with contextlib.suppress(Exception):
            await _blocking(dom.destroy)
        with contextlib.suppress(Exception):
            await _blocking(dom.undefine)

    async def list(self) -> list[VmSpec]:
        lv = _lv()
        domains = await _blocking(
            self._connection().listAllDomains, lv.VIR_CONNECT_LIST_DOMAINS_ACTIVE
        )
        out = []
        for dom in domains:
            spec = await _blocking(self._spec_of, dom)
            if spec is not None and await self.state(spec.vm_id) in ("running", "paused"):
                out.append(spec)
        return out

    async def state(self, vm_id: str) -> VmState:
        dom = await self._lookup(vm_id)
        if dom is None:
            return "absent"
        try:
            state, reason = await _blocking(dom.state)
            if state == _RUNNING:
                return "running"
            if state in (_SHUTDOWN, _SHUTOFF, _CRASHED):
                return "shutoff"
            if state == _PAUSED and reason in (_PAUSED_MIGRATION, _PAUSED_STARTING_UP):
                # waited for (not bounded like the polls): a state must not be a guess
                job = await _blocking(dom.jobStats)
                if job.get("type", _JOB_NONE) != _JOB_NONE:
                    return (
                        "inmigrate" if job.get("operation") == _OP_MIGRATION_IN else "postmigrate"
                    )
            return "paused"
        except _lv().libvirtError:
            return "absent"  # it went away between the lookup and the question

    # --- migration: target side -----------------------------------------------------------

    async def take_ready_incoming(self, spec: VmSpec) -> str | None:
        return None  # peer-to-peer: the source's daemon starts the receiving domain itself

    def ready_shapes(self) -> tuple[str, ...]:
        return ()

    async def prepare_incoming(self, spec: VmSpec, params: MigrationParams) -> str:
        marker = self._marker(spec.vm_id)
        if marker.exists():
            return marker.read_text()
        if await self.state(spec.vm_id) in ("running", "paused"):
            raise RuntimeError(f"vm {spec.vm_id} already runs on {self.host}")
        uri = encode_uri(
            self.peer_uri, f"tcp://{self.migration_host}:{_free_port(self.migration_host)}"
        )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        await self._precreate_disks(spec)  # an adopted guest's disks in copy mode
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(uri)
        tmp.replace(marker)
        return uri

    async def finish_incoming(self, vm_id: str) -> bool:
        deadline = time.monotonic() + self.finish_timeout_s
        while True:
            state = await self.state(vm_id)
            # libvirt resumes the target in the Finish phase, a moment after the source returns
            if state not in ("inmigrate", "absent") or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        if state == "running":
            self._keep_disks(vm_id)
            self._marker(vm_id).unlink(missing_ok=True)
            return True
        return False

    async def abort_incoming(self, vm_id: str) -> None:
        marker = self._marker(vm_id)
        if not marker.exists():
            return
        # a running domain here is the only copy left (p2p ended the source): never destroy it
        if await self.state(vm_id) in ("inmigrate", "paused", "shutoff"):
            dom = await self._lookup(vm_id)
            if dom is not None:
                with contextlib.suppress(Exception):
                    await _blocking(dom.destroy)
        if await self.state(vm_id) != "running":
            await self._remove_disks(vm_id)  # made for this migration by prepare_incoming
        marker.unlink(missing_ok=True)

    # --- migration: source side -----------------------------------------------------------

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

    # --- extras for tests and benchmarks ----------------------------------------------------

    async def guest_status(self, vm_id: str) -> GuestStatus:
        """Read the test guest's status block (see :mod:`.guest`) from guest-physical memory."""
        lv = _lv()
        dom = await self._lookup(vm_id)
        if dom is None:
            raise LookupError(f"no domain {vm_id} on {self.host}")
        raw = await _blocking(dom.memoryPeek, STATUS_ADDR, 16, lv.VIR_MEMORY_PHYSICAL)
        return GuestStatus.from_bytes(bytes(raw))

    async def telemetry(self) -> HostLoad:
        """The host's load (``/proc``) and each domain's (libvirt's CPU and memory statistics)."""
        guests = []
        for spec in await self.list():
            dom = await self._lookup(spec.vm_id)
            if dom is not None:
                guests.append(await _blocking(telemetry.libvirt_guest, self._meter, spec, dom))
        self._meter.forget({g.vm_id for g in guests})
        return await asyncio.to_thread(telemetry.host_load, self.host, self._meter, guests)

    # --- helpers ----------------------------------------------------------------------------

    def _connection(self) -> Any:
        if self._conn is None:
            raise RuntimeError("LibvirtDriver.start() was not called")
        return self._conn

    def _marker(self, vm_id: str) -> Path:
        return self.run_dir / f"{domain_name(vm_id)}.incoming"

    async def _lookup(self, vm_id: str) -> Any:
        try:
            return await _blocking(self._connection().lookupByName, domain_name(vm_id))
        except _lv().libvirtError:
            return None

    def _spec_of(self, dom: Any) -> VmSpec | None:
        return libvirt_domains.ferry_spec(dom, self.peer_uri)  # None: not a Ferry guest

    def _domain_xml(self, spec: VmSpec) -> str:
        if self._guest_image is None:
            raise RuntimeError("LibvirtDriver.start() was not called")
        meta = escape(json.dumps(spec.model_dump(mode="json")))
        return f"""<domain type='{self.domain_type}'>
  <name>{escape(domain_name(spec.vm_id))}</name>
  <metadata><ferry:vm xmlns:ferry='{METADATA_NS}'>{meta}</ferry:vm></metadata>
  <memory unit='MiB'>{spec.memory_mib}</memory>
  <vcpu>{spec.vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='{escape(self.machine)}'>hvm</type>
    <kernel>{escape(str(self._guest_image))}</kernel>
    <cmdline>{escape(guest_cmdline(spec.params))}</cmdline>
  </os>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(self.emulator)}</emulator>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>"""


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


def _progress(status: str, stats: dict[str, Any], ladder: Convergence) -> MigrationProgress:
    total = int(stats.get("memory_total", 0))
    remaining = int(stats.get("memory_remaining", 0))
    return MigrationProgress(
        status=status,
        total_bytes=total,
        transferred_bytes=int(stats.get("memory_processed", 0)),
        remaining_bytes=remaining,
        dirty_pages_rate=int(stats.get("memory_dirty_rate", 0)),
        passes=int(stats.get("memory_iteration", 0)),
        percent=PrecopyWatch.percent(total, remaining),
        disk_total_bytes=int(stats.get("disk_total", 0)),
        disk_transferred_bytes=int(stats.get("disk_processed", 0)),
        disk_remaining_bytes=int(stats.get("disk_remaining", 0)),
        rung=ladder.rung,
        downtime_limit_ms=ladder.downtime_ms,
        postcopy=ladder.postcopy_started,
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


def _free_port(host: str) -> int:
    """A port nobody listens on now; the target's QEMU binds it moments later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
