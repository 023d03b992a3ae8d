"""QEMU driven directly through QMP: one ``qemu-system-x86_64`` process per guest.

Each guest gets a directory under ``run_dir`` holding its QMP socket, pidfile, serial log and
``meta.json`` (the spec, the role and the incoming URI), so a restarted adapter finds its
guests again. Processes are started with ``-daemonize`` and outlive the adapter.

Roles: ``guest`` (created here, or an incoming guest after :meth:`finish_incoming`) and
``incoming`` (started by :meth:`prepare_incoming`, listening for a migration stream).

Guest parameters in ``VmSpec.params``: ``guest_dirty_mib`` and ``guest_rate_mibps`` go to
the test guest's command line (see :mod:`.guest`); anything else is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from ferry_common.clock import SystemClock
from ferry_common.messages.domain import VmSpec
from ferry_common.messages.host_events import HostLoad
from ferry_common.messages.public import incoming_shape

from . import telemetry
from .base import MigrationParams, MigrationProgress, MigrationResult, ProgressCallback, VmState
from .convergence import Convergence, Decision, Ladder
from .guest import STATUS_XP, GuestStatus, default_guest_image, guest_cmdline
from .precopy import PrecopyWatch
from .standby import Shape, StandbyPool, parse_shapes

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# QEMU 7.2's own default for max-bandwidth; set explicitly so a previous cap does not linger
QEMU_DEFAULT_BANDWIDTH = 128 * MIB
# post-copy's states: the guest runs on the target from the first of them on
_POSTCOPY = {"postcopy-active", "postcopy-paused", "postcopy-recover"}
_ACTIVE = {"setup", "active", "pre-switchover", "device", "wait-unplug", "cancelling", *_POSTCOPY}
_UNIX_PATH_MAX = 107
# QEMU's x509 credentials directory: the fleet's CA, and this host's certificate and key as the
# server of incoming streams and as the client of outgoing ones (the same pair may serve both,
# with serverAuth and clientAuth in its extended key usage)
TLS_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem")
TLS_IN, TLS_OUT = "ferry-tls-in", "ferry-tls-out"  # the credentials' ids in every QEMU process


class QmpUnavailable(RuntimeError):
    """The guest's QEMU process is gone or its QMP socket does not answer."""


class QemuDriver:
    """The :class:`~.base.Driver` protocol over QEMU processes and QMP.

    Options: ``run_dir`` (state directory, default ``/tmp/ferry-qemu/<host>``; keep it short,
    unix socket paths are limited to 107 bytes), ``guest_image`` (the ``-kernel`` ELF,
    default: the repo's test guest, built on demand), ``qemu_binary``, ``accel`` (``tcg``;
    ``kvm:tcg`` uses KVM when present), ``machine`` (``pc``; must resolve to the same type on
    both hosts), ``listen_host`` (where incoming guests listen, ``127.0.0.1``),
    ``finish_timeout_s`` (how long :meth:`finish_incoming` waits for ``running``),
    ``standby`` (receiving processes kept ready per VM shape, see :mod:`.standby`; none by
    default), ``standby_refill_s`` (how long after a migration took one its replacement is
    started, 2 s: the saga's last steps run in that time and starting QEMU takes a core),
    ``tls_dir`` (encrypt the migration stream with mutual TLS, see :data:`TLS_FILES`; off by
    default).
    """

    name = "qemu"
    can_resume_source_after_completion = True

    def __init__(
        self,
        host: str,
        *,
        run_dir: str | os.PathLike[str] | None = None,
        guest_image: str | os.PathLike[str] | None = None,
        qemu_binary: str = "qemu-system-x86_64",
        accel: str = "tcg",
        machine: str = "pc",
        listen_host: str = "127.0.0.1",
        finish_timeout_s: float = 10.0,
        standby: str | None = None,
        standby_refill_s: float = 2.0,
        tls_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.host = host
        self.tls_dir = Path(tls_dir).resolve() if tls_dir else None  # QEMU runs from / once daemonized
        if self.tls_dir is not None and "," in str(self.tls_dir):
            raise ValueError(f"tls_dir {self.tls_dir} contains a comma, which QEMU's -object cannot carry")
        self.run_dir = Path(run_dir) if run_dir else Path("/tmp/ferry-qemu") / _safe(host)
        self._guest_image = Path(guest_image) if guest_image else None
        self.qemu_binary = qemu_binary
        self.accel = accel
        self.machine = machine
        self.listen_host = listen_host
        self.finish_timeout_s = finish_timeout_s
        self._clients: dict[str, Any] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._cancel_requested: set[str] = set()
        # guests whose migration away this driver saw complete, by the pid of the process left
        # in postmigrate: its teardown needs no status query first
        self._handed_over: dict[str, int | None] = {}
        self._meter = telemetry.CpuMeter(SystemClock())  # CPU rates for telemetry()
        # guests whose last migration away went through post-copy: their source is stale
        self._postcopied: set[str] = set()
        self.standby = StandbyPool(parse_shapes(standby))
        self.standby_refill_s = standby_refill_s
        self._filling: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()  # QMP clients of killed processes

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if shutil.which(self.qemu_binary) is None:
            raise RuntimeError(f"{self.qemu_binary} not found (scripts/ensure-hypervisors.sh)")
        await self._image()
        if self.tls_dir is not None:
            missing = [f for f in TLS_FILES if not (self.tls_dir / f).is_file()]
            if missing:
                raise RuntimeError(f"migration TLS: {', '.join(missing)} missing in {self.tls_dir}")
        for leftover in sorted(self._standby_dir().glob("*")):  # a previous run's: not known ready
            await self._kill_dir(leftover)
        self._fill_standby()

    async def close(self) -> None:
        if self._filling is not None:
            self._filling.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._filling
        for name in self.standby.names():
            await self._kill_dir(self._standby_dir() / name)
        self.standby.ready.clear()
        for client in list(self._clients.values()):
            await _disconnect(client)
        self._clients.clear()
        await asyncio.gather(*self._closing, return_exceptions=True)

    async def create(self, spec: VmSpec) -> None:
        async with self._lock(spec.vm_id):
            meta = self._meta(spec.vm_id)
            if meta and self._alive(spec.vm_id):
                if meta["role"] != "guest":
                    raise RuntimeError(f"vm {spec.vm_id} is an incoming guest on {self.host}")
                return
            await self._launch(spec, role="guest")

    async def destroy(self, vm_id: str) -> None:
        async with self._lock(vm_id):
            await self._kill(vm_id)

    async def telemetry(self) -> HostLoad:
        """The host's load (``/proc``) and each guest's: its QEMU process's CPU time and RSS."""
        guests = [(spec, self.pid(spec.vm_id)) for spec in await self.list()]
        return await asyncio.to_thread(
            lambda: telemetry.host_load(self.host, self._meter, telemetry.process_guests(self._meter, guests)))

    async def list(self) -> list[VmSpec]:
        out: list[VmSpec] = []
        if not self.run_dir.exists():
            return out
        for meta_file in sorted(self.run_dir.glob("*/meta.json")):
            meta = json.loads(meta_file.read_text())
            if meta["role"] == "guest" and await self.state(meta["spec"]["vm_id"]) in (
                "running",
                "paused",
            ):
                out.append(VmSpec.model_validate(meta["spec"]))
        return out

    async def state(self, vm_id: str) -> VmState:
        if not self._meta(vm_id) or not self._alive(vm_id):
            return "absent"
        try:
            status = (await self._qmp(vm_id, "query-status"))["status"]
        except QmpUnavailable:
            return "absent"
        return _vm_state(status)

    # --- migration: target side -----------------------------------------------------------

    async def prepare_incoming(self, spec: VmSpec, params: MigrationParams) -> str:
        uri = await self._prepare(spec, launch=True)
        assert uri is not None
        return uri

    async def take_ready_incoming(self, spec: VmSpec) -> str | None:
        return await self._prepare(spec, launch=False)

    def ready_shapes(self) -> tuple[str, ...]:
        return tuple(sorted(incoming_shape(s.memory_mib, s.vcpus) for s, names in self.standby.ready.items() if names))

    async def _prepare(self, spec: VmSpec, *, launch: bool) -> str | None:
        async with self._lock(spec.vm_id):
            meta = self._meta(spec.vm_id)
            if meta and self._alive(spec.vm_id):
                if meta["role"] == "guest":
                    raise RuntimeError(f"vm {spec.vm_id} already runs on {self.host}")
                status = await self._status_or_none(spec.vm_id)
                if status == "inmigrate" and meta.get("uri"):
                    return str(meta["uri"])
                # an incoming guest that is no longer waiting (a stream came and went)
                await self._kill(spec.vm_id)
            elif meta:
                await self._kill(spec.vm_id)
            uri = await self._adopt_standby(spec)  # recorded in its meta as it is taken
            if uri is None and launch:
                await self._launch(spec, role="incoming")
                uri = await self._listen(spec.vm_id)
                self._update_meta(spec.vm_id, uri=uri)
            return uri

    async def _listen(self, key: str) -> str:
        """Have the receiving process ``key`` listen for the stream; its URI."""
        if self.tls_dir is not None:
            # before it listens: a stream that does not open with a TLS handshake signed by
            # the fleet's CA, from a certificate of its own, is refused
            await self._qmp(key, "migrate-set-parameters", {"tls-creds": TLS_IN})
        try:
            # accepted on every receiving process (a standby is taken before the VM's policy is
            # known); a source whose policy forbids post-copy simply never asks for it
            await self._qmp(key, "migrate-set-capabilities",
                            {"capabilities": [{"capability": "postcopy-ram", "state": True}]})
        except Exception as exc:  # no userfaultfd here: pre-copy only
            log.warning("post-copy not available on %s: %s", self.host, exc)
        # port 0: QEMU binds a free port itself, so there is no race with other listeners
        await self._qmp(key, "migrate-incoming", {"uri": f"tcp:{self.listen_host}:0"})
        info = await self._qmp(key, "query-migrate")
        return f"tcp:{self.listen_host}:{int(info['socket-address'][0]['port'])}"

    async def finish_incoming(self, vm_id: str) -> bool:
        meta = self._meta(vm_id)
        if not meta:
            return False
        deadline = time.monotonic() + self.finish_timeout_s
        try:
            # the guest resumes here once its state is loaded (RESUME): seen at once
            async with self._events(vm_id, ("RESUME", "MIGRATION")) as changed:
                while True:
                    status = await self._status_or_none(vm_id)
                    # just after the source reports completed the target may still be loading state
                    if status != "inmigrate" or time.monotonic() > deadline:
                        break
                    await changed(0.02)
        except QmpUnavailable:
            status = None
        if status == "running":
            self._update_meta(vm_id, role="guest")
        # the pool is topped up a little after the migration that took a standby: starting
        # QEMU costs a core for ~50 ms, which the saga's last steps should not have to share
        self._fill_standby(self.standby_refill_s)
        return status == "running"

    async def abort_incoming(self, vm_id: str) -> None:
        async with self._lock(vm_id):
            meta = self._meta(vm_id)
            # a finished incoming guest is a guest of this host now: not ours to tear down
            if meta and meta["role"] == "incoming":
                await self._kill(vm_id)
        self._fill_standby(self.standby_refill_s)

    # --- migration: source side -----------------------------------------------------------

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

    @contextlib.asynccontextmanager
    async def _events(self, vm_id: str, names: tuple[str, ...]) -> AsyncIterator[Callable[[float], Awaitable[None]]]:
        """Yield ``wait(timeout)``: returns when QEMU sends one of the events ``names`` (a
        migration status change, the guest resuming) or after ``timeout``, whichever is first;
        a poll with a doorbell."""
        from qemu.qmp import EventListener

        client = await self._client(vm_id)
        listener = EventListener(names)
        client.register_listener(listener)

        async def wait(timeout: float) -> None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(listener.get(), timeout)
            listener.clear()

        try:
            yield wait
        finally:
            with contextlib.suppress(Exception):
                client.remove_listener(listener)

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
                await on_progress(_progress(status, info.get("ram", ram), ladder, done=True))
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
                sample = _progress(status, ram, ladder)
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

    # --- extras for tests and benchmarks ----------------------------------------------------

    async def guest_status(self, vm_id: str) -> GuestStatus:
        """Read the test guest's status block (see :mod:`.guest`) through the monitor."""
        text = await self._qmp(vm_id, "human-monitor-command", {"command-line": STATUS_XP})
        return GuestStatus.from_xp(str(text))

    async def qmp(self, vm_id: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run a raw QMP command on a guest's process."""
        return await self._qmp(vm_id, command, arguments)

    def pid(self, vm_id: str) -> int | None:
        """The guest's QEMU process id, if it runs."""
        return self._pid(vm_id) if self._alive(vm_id) else None

    # --- standby receiving processes (see .standby) ---------------------------------------

    def _standby_dir(self) -> Path:
        return self.run_dir / ".standby"  # not a guest directory: list() and state() skip it

    def _fill_standby(self, delay_s: float = 0.0) -> None:
        if self.standby.wanted and (self._filling is None or self._filling.done()):
            self._filling = asyncio.create_task(self._fill(delay_s), name=f"standby:{self.host}")

    async def _fill(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        for shape in self.standby.missing():
            name = f"{shape.memory_mib}-{shape.vcpus}-{uuid.uuid4().hex[:8]}"
            spec = VmSpec(vm_id=name, memory_mib=shape.memory_mib, vcpus=shape.vcpus, driver=self.name)
            vm_dir = self._standby_dir() / name
            key = _standby_key(name)
            try:
                await self._launch(spec, role="incoming", vm_dir=vm_dir)
                # connected and listening already: taking it is then a rename, not a QMP
                # handshake and two commands inside the saga's time
                await self._client(key, sock=vm_dir / "qmp.sock")
                _write_meta(vm_dir, {**(_read_meta(vm_dir) or {}), "uri": await self._listen(key)})
            except Exception:
                log.exception("standby QEMU %s on %s not started", name, self.host)
                await self._end(vm_dir, key)
                return  # tried again once the next incoming migration is over
            self.standby.add(shape, name)

    async def _adopt_standby(self, spec: VmSpec) -> str | None:
        """Take a ready standby of the VM's shape as its receiving process (caller holds the
        VM's lock and has cleared its directory); the URI it listens on, None if there is none."""
        while (name := self.standby.take(Shape(spec.memory_mib, spec.vcpus))) is not None:
            standby, key = self._standby_dir() / name, _standby_key(name)
            client = self._clients.get(key)
            pid = _read_pid(standby)
            uri = (_read_meta(standby) or {}).get("uri")
            if client is None or client.runstate.name != "RUNNING" or pid is None or not _process_alive(pid) or not uri:
                await self._end(standby, key)
                continue  # died while waiting: the next one, or a fresh launch
            vm_dir = self._dir(spec.vm_id)
            shutil.rmtree(vm_dir, ignore_errors=True)
            # a renamed directory keeps its unix socket and pidfile working: the process
            # holds them by inode, and its QMP client stays connected
            standby.rename(vm_dir)
            self._clients[spec.vm_id] = self._clients.pop(key)
            self._connecting.pop(key, None)
            self._update_meta(spec.vm_id, spec=spec.model_dump(mode="json"), role="incoming", uri=uri)
            if await self._status_or_none(spec.vm_id) != "inmigrate":
                # something reached its port and ended it while it waited: not usable
                await self._kill(spec.vm_id)
                continue
            return str(uri)
        return None

    async def _kill_dir(self, vm_dir: Path) -> None:
        pid = _read_pid(vm_dir)
        if pid is not None and _process_alive(pid):
            await _kill_and_wait(pid)
        shutil.rmtree(vm_dir, ignore_errors=True)

    # --- processes ------------------------------------------------------------------------

    def _dir(self, vm_id: str) -> Path:
        return self.run_dir / _safe(vm_id)

    def _lock(self, vm_id: str) -> asyncio.Lock:
        return self._locks.setdefault(vm_id, asyncio.Lock())

    def _meta(self, vm_id: str) -> dict[str, Any] | None:
        return _read_meta(self._dir(vm_id))

    def _update_meta(self, vm_id: str, **changes: Any) -> None:
        meta = self._meta(vm_id) or {}
        meta.update(changes)
        _write_meta(self._dir(vm_id), meta)

    async def _image(self) -> Path:
        if self._guest_image is None:
            self._guest_image = await asyncio.to_thread(default_guest_image)
        if not self._guest_image.exists():
            raise FileNotFoundError(f"guest image {self._guest_image} not found")
        return self._guest_image

    async def _launch(self, spec: VmSpec, role: str, vm_dir: Path | None = None) -> None:
        vm_dir = vm_dir or self._dir(spec.vm_id)
        if vm_dir.exists():
            shutil.rmtree(vm_dir)
        vm_dir.mkdir(parents=True)
        sock = vm_dir / "qmp.sock"
        if len(str(sock)) > _UNIX_PATH_MAX:
            raise ValueError(f"QMP socket path too long ({sock}); use a shorter run_dir")
        argv = [
            self.qemu_binary,
            "-name", f"{spec.vm_id},process=ferry-{_safe(spec.vm_id)}",
            "-machine", f"{self.machine},accel={self.accel}",
            "-m", str(spec.memory_mib),
            "-smp", str(spec.vcpus),
            "-nodefaults", "-vga", "none", "-display", "none",
            "-serial", f"file:{vm_dir / 'serial.log'}",
            "-kernel", str(await self._image()),
            "-append", guest_cmdline(spec.params),
            "-qmp", f"unix:{sock},server=on,wait=off",
            "-pidfile", str(vm_dir / "pid"),
            "-daemonize",
        ]  # fmt: skip
        if self.tls_dir is not None:
            # both ends in every process: a guest received today is migrated out tomorrow
            argv += [
                "-object", f"tls-creds-x509,id={TLS_IN},endpoint=server,verify-peer=on,dir={self.tls_dir}",
                "-object", f"tls-creds-x509,id={TLS_OUT},endpoint=client,verify-peer=on,dir={self.tls_dir}",
            ]  # fmt: skip
        if role == "incoming":
            argv += ["-incoming", "defer"]
        _write_meta(vm_dir, {"spec": spec.model_dump(mode="json"), "role": role, "uri": None})
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            shutil.rmtree(vm_dir, ignore_errors=True)
            raise RuntimeError(
                f"qemu failed to start {spec.vm_id}: {(err or out).decode().strip()}"
            )

    def _pid(self, vm_id: str) -> int | None:
        return _read_pid(self._dir(vm_id))

    def _alive(self, vm_id: str) -> bool:
        pid = self._pid(vm_id)
        return pid is not None and _process_alive(pid)

    async def _kill(self, vm_id: str) -> None:
        await self._end(self._dir(vm_id), vm_id)

    async def _end(self, vm_dir: Path, key: str) -> None:
        """Kill the process of ``vm_dir`` and forget its QMP client (kept under ``key``)."""
        # the process goes first: a QMP disconnect from a live QEMU waits for its reader and
        # writer to wind down (~2 ms), and the source's teardown is on the saga's last step
        client = self._clients.pop(key, None)
        self._connecting.pop(key, None)
        await self._kill_dir(vm_dir)
        if client is not None:
            # and its client is wound down beside what follows (1-3 ms even then)
            task = asyncio.create_task(_disconnect(client))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    # --- QMP ------------------------------------------------------------------------------

    async def _client(self, vm_id: str, sock: Path | None = None) -> Any:
        """The connected QMP client of ``vm_id`` (a guest's, or a standby's by its key and
        ``sock``), connecting on first use or after the connection broke."""
        client = self._clients.get(vm_id)
        if client is not None and client.runstate.name == "RUNNING":
            return client
        # QEMU serves one QMP client at a time: commands sent together while none is connected
        # share the connection the first of them makes (a second would wait for its greeting)
        async with self._connecting.setdefault(vm_id, asyncio.Lock()):
            client = self._clients.get(vm_id)
            if client is not None and client.runstate.name == "RUNNING":
                return client
            await self._forget_client(vm_id)
            if sock is None:
                if not self._alive(vm_id):
                    raise QmpUnavailable(f"no QEMU process for {vm_id}")
                sock = self._dir(vm_id) / "qmp.sock"
            client = _qmp_client_class()(f"ferry-{self.host}-{vm_id}")
            try:
                await client.connect(str(sock))
            except Exception as exc:
                raise QmpUnavailable(f"cannot connect to QMP of {vm_id}: {exc}") from exc
            self._clients[vm_id] = client
            return client

    async def _forget_client(self, key: str) -> None:
        client = self._clients.pop(key, None)
        if client is not None:
            await _disconnect(client)

    async def _qmp(self, vm_id: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
        from qemu.qmp import ExecuteError

        client = await self._client(vm_id)
        try:
            return await client.execute(command, arguments)
        except ExecuteError:
            raise
        except Exception as exc:  # the connection broke: the process died under us
            self._clients.pop(vm_id, None)
            raise QmpUnavailable(f"QMP {command} on {vm_id} failed: {exc!r}") from exc

    async def _status_or_none(self, vm_id: str) -> str | None:
        try:
            return str((await self._qmp(vm_id, "query-status"))["status"])
        except QmpUnavailable:
            return None


@functools.cache
def _qmp_client_class() -> type[Any]:
    """``QMPClient`` that formats a message for its debug log only when that log is on.

    The library renders every message it sends or receives as indented JSON (the standard
    library's pure-Python encoder) before the logger drops the line: about a twentieth of the
    CPU of the QEMU bench's services, mostly ``query-migrate`` replies. Imported lazily: only
    this driver needs the package."""
    from qemu.qmp import QMPClient
    from qemu.qmp.message import Message

    class QuietQMPClient(QMPClient):  # type: ignore[misc]
        def _cb_outbound(self, msg: Message) -> Message:
            if self.logger.isEnabledFor(logging.DEBUG):
                self.logger.debug("--> %s", str(msg))
            return msg

        def _cb_inbound(self, msg: Message) -> Message:
            if self.logger.isEnabledFor(logging.DEBUG):
                self.logger.debug("<-- %s", str(msg))
            return msg

    return QuietQMPClient


async def _disconnect(client: Any) -> None:
    with contextlib.suppress(Exception):
        await client.disconnect()


def _write_meta(vm_dir: Path, meta: dict[str, Any]) -> None:
    tmp = vm_dir / "meta.json.tmp"
    tmp.write_text(json.dumps(meta))
    tmp.replace(vm_dir / "meta.json")


def _read_meta(vm_dir: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads((vm_dir / "meta.json").read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _standby_key(name: str) -> str:
    # a standby's QMP client is kept under a key no VM id can take (ids begin with a letter or digit)
    return f".standby/{name}"


def _read_pid(vm_dir: Path) -> int | None:
    try:
        return int((vm_dir / "pid").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _safe(name: str) -> str:
    """A short file-name-safe form of a name, unique through a hash suffix."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:24]
    return f"{cleaned}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


async def _kill_and_wait(pid: int, timeout_s: float = 5.0) -> None:
    """SIGKILL ``pid`` and return once it has exited: a pidfd (opened before the signal, so
    the pid cannot be reused in between) becomes readable at once; polled where there is none."""
    fd: int | None = None
    with contextlib.suppress(OSError, AttributeError):
        fd = os.pidfd_open(pid)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        if fd is not None:
            os.close(fd)
        return
    if fd is None:
        for _ in range(int(timeout_s / 0.005)):
            if not _process_alive(pid):
                return
            await asyncio.sleep(0.005)
        return
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def on_exit() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, on_exit)
    try:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(exited, timeout_s)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _process_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # a daemonized QEMU is reparented to pid 1, which may never reap it: a zombie is dead
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _vm_state(status: str) -> VmState:
    if status in ("running", "debug"):
        return "running"
    if status in ("inmigrate", "postmigrate"):
        return status  # type: ignore[return-value]
    if status in ("shutdown", "guest-panicked", "internal-error"):
        return "shutoff"
    return "paused"


def _progress(status: str, ram: dict[str, Any], ladder: Convergence, done: bool = False) -> MigrationProgress:
    total = int(ram.get("total", 0))
    remaining = 0 if done else int(ram.get("remaining", 0))
    return MigrationProgress(
        status=status,
        total_bytes=total,
        transferred_bytes=int(ram.get("transferred", 0)),
        remaining_bytes=remaining,
        dirty_pages_rate=int(ram.get("dirty-pages-rate", 0)),
        passes=int(ram.get("dirty-sync-count", 0)),
        percent=PrecopyWatch.percent(total, remaining),
        rung=ladder.rung,
        downtime_limit_ms=ladder.downtime_ms,
        postcopy=ladder.postcopy_started,
    )


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
