"""The QEMU driver's standby receiving processes (see :mod:`.standby`): started ahead, kept
connected and listening, taken by an incoming migration of their shape."""

from __future__ import annotations

import asyncio
import logging
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ferry_common.messages.domain import VmSpec

from .qemu_files import _kill_and_wait, _process_alive, _read_meta, _read_pid, _write_meta
from .qemu_qmp import QmpMixin
from .standby import Shape, StandbyPool

log = logging.getLogger("ferry_hypervisor_adapter.drivers.qemu")


def _standby_key(name: str) -> str:
    # a standby's QMP client is kept under a key no VM id can take (ids begin with a letter or digit)
    return f".standby/{name}"


class StandbyMixin(QmpMixin):
    """Standby processes of :class:`~.qemu.QemuDriver` (its ``standby`` pool)."""

    name: str
    run_dir: Path
    standby: StandbyPool
    _filling: asyncio.Task[None] | None

    if TYPE_CHECKING:  # the driver's processes and its target side (.qemu)

        def _update_meta(self, vm_id: str, **changes: Any) -> None: ...
        async def _launch(self, spec: VmSpec, role: str, vm_dir: Path | None = None) -> None: ...
        async def _listen(self, key: str) -> str: ...
        async def _kill(self, vm_id: str) -> None: ...
        async def _end(self, vm_dir: Path, key: str) -> None: ...

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
