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
import json
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from ferry_common.clock import SystemClock
from ferry_common.messages.domain import VmSpec
from ferry_common.messages.host_events import HostLoad

from . import libvirt_domains, telemetry
from .base import MigrationParams, VmState
from .guest import STATUS_ADDR, GuestImage, GuestStatus, guest_cmdline
from .libvirt_adopted import AdoptedDomains
from .libvirt_calls import (  # noqa: F401 - re-exported: the names callers import from here
    _CRASHED,
    _JOB_NONE,
    _OP_MIGRATION_IN,
    _PAUSED,
    _PAUSED_MIGRATION,
    _PAUSED_STARTING_UP,
    _RUNNING,
    _SHUTDOWN,
    _SHUTOFF,
    MIB,
    URI_SCHEME,
    _blocking,
    _lv,
    decode_uri,
    domain_name,
    encode_uri,
)
from .libvirt_domains import METADATA_NS
from .libvirt_migration import MigrationSource, _watched  # noqa: F401

log = logging.getLogger(__name__)


class LibvirtDriver(MigrationSource, AdoptedDomains):
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
        guest_dir: str | os.PathLike[str] | None = None,
        emulator: str = "/usr/bin/qemu-system-x86_64",
        machine: str = "pc",
        domain_type: str = "qemu",
        finish_timeout_s: float = 10.0,
        abort_grace_s: float = 5.0,
        tls: bool = False,
        capacity_mib: int | None = None,
    ) -> None:
        self.host = host
        self.capacity_mib = telemetry.offered_mib(capacity_mib)
        self.tls = tls
        self.uri = uri
        self.peer_uri = peer_uri or uri
        self.migration_host = migration_host
        safe_host = re.sub(r"[^A-Za-z0-9._-]", "_", host)
        self.run_dir = Path(run_dir) if run_dir else Path("/tmp/ferry-libvirt-driver") / safe_host
        self.guest = GuestImage(guest_image, guest_dir)
        self.emulator = emulator
        self.machine = machine
        self.domain_type = domain_type
        self.finish_timeout_s = finish_timeout_s
        self.abort_grace_s = abort_grace_s
        self._conn: Any = None
        self._cancel_requested: set[str] = set()
        self._aborts: dict[str, asyncio.Task[bool]] = {}  # vm_id -> an operator's cancel under way
        self._postcopy: set[str] = set()  # outgoing migrations in post-copy: not to be cancelled
        self._meter = telemetry.CpuMeter(SystemClock())  # CPU rates for telemetry()

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        lv = _lv()
        # libvirt prints every error to stderr by default; they reach us as exceptions anyway
        lv.registerErrorHandler(lambda _ctx, _err: None, None)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._conn = await _blocking(lv.open, self.uri)
        await self.guest.resolve()

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

    async def telemetry(self) -> HostLoad:
        """The host's load (``/proc``) and each domain's (libvirt's CPU and memory statistics)."""
        guests = []
        for spec in await self.list():
            dom = await self._lookup(spec.vm_id)
            if dom is not None:
                guests.append(await _blocking(telemetry.libvirt_guest, self._meter, spec, dom))
        self._meter.forget({g.vm_id for g in guests})
        return await asyncio.to_thread(telemetry.host_load, self.host, self._meter, guests)

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

    # --- extras for tests and benchmarks ----------------------------------------------------

    async def guest_status(self, vm_id: str) -> GuestStatus:
        """Read the test guest's status block (see :mod:`.guest`) from guest-physical memory."""
        lv = _lv()
        dom = await self._lookup(vm_id)
        if dom is None:
            raise LookupError(f"no domain {vm_id} on {self.host}")
        raw = await _blocking(dom.memoryPeek, STATUS_ADDR, 16, lv.VIR_MEMORY_PHYSICAL)
        return GuestStatus.from_bytes(bytes(raw))

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
        if self.guest.path is None:
            raise RuntimeError("LibvirtDriver.start() was not called")
        meta = escape(json.dumps(spec.model_dump(mode="json")))
        return f"""<domain type='{self.domain_type}'>
  <name>{escape(domain_name(spec.vm_id))}</name>
  <metadata><ferry:vm xmlns:ferry='{METADATA_NS}'>{meta}</ferry:vm></metadata>
  <memory unit='MiB'>{spec.memory_mib}</memory>
  <vcpu>{spec.vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='{escape(self.machine)}'>hvm</type>
    <kernel>{escape(str(self.guest.path))}</kernel>
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


def _free_port(host: str) -> int:
    """A port nobody listens on now; the target's QEMU binds it moments later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
