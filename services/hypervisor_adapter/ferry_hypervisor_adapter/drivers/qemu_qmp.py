"""The QMP side of the QEMU driver: one connected client per guest process, commands over
it, and QEMU's events as a doorbell for polls."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any


class QmpUnavailable(RuntimeError):
    """The guest's QEMU process is gone or its QMP socket does not answer."""


class QmpMixin:
    """QMP clients of :class:`~.qemu.QemuDriver`, one per guest process (or standby, by key)."""

    host: str
    _clients: dict[str, Any]
    _connecting: dict[str, asyncio.Lock]

    if TYPE_CHECKING:  # the driver's processes (.qemu)

        def _alive(self, vm_id: str) -> bool: ...
        def _dir(self, vm_id: str) -> Path: ...

    @contextlib.asynccontextmanager
    async def _events(
        self, vm_id: str, names: tuple[str, ...]
    ) -> AsyncIterator[Callable[[float], Awaitable[None]]]:
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
