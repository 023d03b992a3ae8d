"""The dirtying test guest (``guest/`` in the repo): build it, configure it, read its status.

The guest is a 32-bit multiboot ELF booted with ``-kernel``. Its command line takes
``dirty_mib=N`` (how much RAM it keeps rewriting) and ``rate_mibps=R`` (how fast, in MiB of
pages per second; 0 means as fast as it can). A VM's ``VmSpec.params`` carry them as
``guest_dirty_mib`` and ``guest_rate_mibps``; both default to 0, an idle guest that only
bumps its counters. It keeps a status block of four 32-bit words at guest-physical
``STATUS_ADDR``: magic, heartbeat (+1 per loop), uptime in ms, pages dirtied.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATUS_ADDR = 0x80000  # keep in sync with guest/status.h
STATUS_MAGIC = 0xFE44A001
STATUS_XP = f"xp /4xw {STATUS_ADDR:#x}"  # HMP command that prints the block
IMAGE_NAME = "dirtier.elf"


@dataclass(frozen=True)
class GuestStatus:
    """The guest's status block; ``heartbeat`` advancing means the guest's vCPU runs."""

    magic: int
    heartbeat: int
    uptime_ms: int
    pages: int

    @property
    def valid(self) -> bool:
        return self.magic == STATUS_MAGIC

    @classmethod
    def from_bytes(cls, raw: bytes) -> GuestStatus:
        return cls(*struct.unpack("<4I", raw[:16]))

    @classmethod
    def from_xp(cls, text: str) -> GuestStatus:
        """Parse the HMP output of :data:`STATUS_XP`."""
        words = [int(w, 16) for w in re.findall(r"0x([0-9a-fA-F]{8})\b", text.split(":", 1)[-1])]
        if len(words) < 4:
            raise ValueError(f"unexpected xp output: {text!r}")
        return cls(*words[:4])


def guest_cmdline(params: dict[str, Any]) -> str:
    """The kernel command line for a VM's ``params`` (``guest_dirty_mib``, ``guest_rate_mibps``)."""
    dirty = int(params.get("guest_dirty_mib", 0))
    rate = int(params.get("guest_rate_mibps", 0))
    if dirty < 0 or rate < 0:
        raise ValueError("guest_dirty_mib and guest_rate_mibps must be >= 0")
    return f"dirty_mib={dirty} rate_mibps={rate}"


def guest_source_dir(configured: str | os.PathLike[str] | None = None) -> Path:
    """``configured`` (the settings' ``guest_dir``, ``FERRY_GUEST_DIR``) or the repo's ``guest/``
    (this file lives four levels below the root)."""
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[4] / "guest"


def build_guest(source: Path | None = None) -> Path:
    """Run ``make`` in the guest directory (a no-op when up to date) and return the image path.

    Serialised with a lock file because test workers and drivers may build at the same time.
    """
    src = source or guest_source_dir()
    if not (src / "Makefile").exists():
        raise FileNotFoundError(f"guest sources not found in {src} (set FERRY_GUEST_DIR)")
    (src / "build").mkdir(exist_ok=True)
    with open(src / "build" / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = subprocess.run(["make", "-s", "-C", str(src)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"guest build failed:\n{done.stdout}\n{done.stderr}")
    return src / "build" / IMAGE_NAME


def default_guest_image(guest_dir: str | os.PathLike[str] | None = None) -> Path:
    """The guest built from ``guest_dir`` (default: the repo's), if needed. A driver asks for it
    when it was given no ``guest_image`` (the settings' ``FERRY_GUEST_IMAGE``)."""
    return build_guest(guest_source_dir(guest_dir))


class GuestImage:
    """The kernel a driver boots: the one configured (``FERRY_GUEST_IMAGE``), else the guest
    built from ``guest_dir`` (``FERRY_GUEST_DIR``, default: the repo's), built once, on first use."""

    def __init__(self, image: str | os.PathLike[str] | None = None, guest_dir: str | os.PathLike[str] | None = None):
        self.path = Path(image) if image else None
        self.guest_dir = guest_dir

    async def resolve(self) -> Path:
        """The image's path, building the default guest (in a thread) the first time."""
        if self.path is None:
            self.path = await asyncio.to_thread(default_guest_image, self.guest_dir)
        return self.path
