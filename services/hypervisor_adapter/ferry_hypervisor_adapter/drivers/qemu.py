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
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ferry_common.clock import SystemClock
from ferry_common.messages.domain import VmSpec
from ferry_common.messages.host_events import HostLoad
from ferry_common.messages.public import incoming_shape

from . import telemetry
from .base import MigrationParams, VmState
from .guest import STATUS_XP, GuestImage, GuestStatus, guest_cmdline
from .qemu_files import (
    _UNIX_PATH_MAX,
    TLS_FILES,
    TLS_IN,
    TLS_OUT,
    _kill_and_wait,
    _process_alive,
    _read_meta,
    _read_pid,
    _safe,
    _write_meta,
)
from .qemu_migration import QEMU_DEFAULT_BANDWIDTH, MigrationMixin
from .qemu_qmp import QmpUnavailable, _disconnect
from .qemu_standby import StandbyMixin
from .standby import StandbyPool, parse_shapes

# the names other modules and tests import from here
__all__ = [
    "QEMU_DEFAULT_BANDWIDTH",
    "TLS_FILES",
    "QemuDriver",
    "QmpUnavailable",
    "_kill_and_wait",
    "_process_alive",
    "_read_pid",
]

log = logging.getLogger(__name__)


class QemuDriver(MigrationMixin, StandbyMixin):
    """The :class:`~.base.Driver` protocol over QEMU processes and QMP. The migration's
    source side, the standby pool and the QMP clients are in their own modules (mixins).

    Options: ``run_dir`` (state directory, default ``/tmp/ferry-qemu/<host>``; keep it short,
    unix socket paths are limited to 107 bytes), ``guest_image`` (the ``-kernel`` ELF,
    default: the repo's test guest, built on demand from ``guest_dir``), ``qemu_binary``, ``accel`` (``tcg``;
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
        guest_dir: str | os.PathLike[str] | None = None,
        qemu_binary: str = "qemu-system-x86_64",
        accel: str = "tcg",
        machine: str = "pc",
        listen_host: str = "127.0.0.1",
        finish_timeout_s: float = 10.0,
        standby: str | None = None,
        standby_refill_s: float = 2.0,
        tls_dir: str | os.PathLike[str] | None = None,
        capacity_mib: int | None = None,
    ) -> None:
        self.host = host
        self.capacity_mib = telemetry.offered_mib(capacity_mib)
        self.tls_dir = Path(tls_dir).resolve() if tls_dir else None  # QEMU runs from / once daemonized
        if self.tls_dir is not None and "," in str(self.tls_dir):
            raise ValueError(f"tls_dir {self.tls_dir} contains a comma, which QEMU's -object cannot carry")
        self.run_dir = Path(run_dir) if run_dir else Path("/tmp/ferry-qemu") / _safe(host)
        self.guest = GuestImage(guest_image, guest_dir)
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
        # guests whose last migration away went through post-copy: their source is stale
        self._postcopied: set[str] = set()
        self.standby = StandbyPool(parse_shapes(standby))
        self.standby_refill_s = standby_refill_s
        self._filling: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()  # QMP clients of killed processes
        self._meter = telemetry.CpuMeter(SystemClock())  # CPU rates for telemetry()

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
        image = await self.guest.resolve()
        if not image.exists():
            raise FileNotFoundError(f"guest image {image} not found")
        return image

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


def _vm_state(status: str) -> VmState:
    if status in ("running", "debug"):
        return "running"
    if status in ("inmigrate", "postmigrate"):
        return status  # type: ignore[return-value]
    if status in ("shutdown", "guest-panicked", "internal-error"):
        return "shutoff"
    return "paused"
