"""A QEMU guest's directory and process: its ``meta.json``, its pidfile, and ending it.

Every guest has a directory under the driver's ``run_dir`` (see :mod:`.qemu`); these are the
file and process operations on it, apart from the driver's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
from pathlib import Path
from typing import Any

_UNIX_PATH_MAX = 107
# QEMU's x509 credentials directory: the fleet's CA, and this host's certificate and key as the
# server of incoming streams and as the client of outgoing ones (the same pair may serve both,
# with serverAuth and clientAuth in its extended key usage)
TLS_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem")
TLS_IN, TLS_OUT = "ferry-tls-in", "ferry-tls-out"  # the credentials' ids in every QEMU process


def _write_meta(vm_dir: Path, meta: dict[str, Any]) -> None:
    tmp = vm_dir / "meta.json.tmp"
    tmp.write_text(json.dumps(meta))
    tmp.replace(vm_dir / "meta.json")


def _read_meta(vm_dir: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads((vm_dir / "meta.json").read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


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
