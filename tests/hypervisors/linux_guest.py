"""Ferry's Linux test guest (``guest/linux``) as an operator's libvirt domain, and what the tests
read of it from outside: its serial console and its disk.

The guest prints ``FERRY boot=B n=N up=U blk=K sha=S`` once per record it wrote to its disk
(``guest/linux/init.sh``). A block's content is fixed by its record, so the test rebuilds it and
checks the disk image against the guest's own report of what it wrote.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .conftest import LIBVIRT_STATE, REPO

BUILD = REPO / "guest" / "linux" / "build.sh"
BLOCK = 4096
BLOCKS = 256  # ferry_blocks on the command line
RECORD = re.compile(r"FERRY boot=(\w+) n=(\d+) up=([\d.]+) blk=(\d+) sha=(\w+)")
IMAGES = "/var/lib/libvirt/images"  # in each test daemon's own view (its private /var/lib/libvirt)
CONSOLES = "/var/log/libvirt/qemu"


def build() -> Path:
    """The kernel, initramfs and empty disk image, built (or taken from the cache) by the repo's step."""
    done = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"guest/linux/build.sh failed:\n{done.stdout}\n{done.stderr}")
    return Path(done.stdout.strip().splitlines()[-1])


def on_host(host: str, path: str) -> Path:
    """Where the test sees a file that daemon ``host`` sees at ``path`` (its bind mounts)."""
    for inside, outside in (("/var/lib/libvirt", "lib"), ("/var/log/libvirt", "log")):
        if path.startswith(inside + "/"):
            return LIBVIRT_STATE / host / outside / path[len(inside) + 1:]
    return Path(path)


def domain_xml(name: str, files: Path, disk: str, console: str, memory_mib: int = 256) -> str:
    """The operator's persistent domain: the Linux guest with its disk and a serial console file."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{files / 'vmlinuz'}</kernel>
    <initrd>{files / 'initrd.gz'}</initrd>
    <cmdline>console=ttyS0 quiet panic=0 ferry_blocks={BLOCKS}</cmdline>
  </os>
  <cpu mode='custom' match='exact' check='none'><model fallback='forbid'>qemu64</model></cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='{console}' append='on'/><target port='0'/></serial>
    <console type='file'><source path='{console}' append='on'/><target type='serial' port='0'/></console>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>"""


@dataclass(frozen=True)
class Record:
    boot: str
    n: int
    up: float
    blk: int
    sha: str


def records(text: str) -> list[Record]:
    return [Record(m[1], int(m[2]), float(m[3]), int(m[4]), m[5]) for m in RECORD.finditer(text)]


def block_content(n: int, blk: int) -> bytes:
    """What record ``n`` wrote to block ``blk`` (init.sh: 128 lines of 32 bytes)."""
    return f"ferry seq={n:010d} blk={blk:06d}\n".encode() * 128


def disk_problems(image: Path, recs: list[Record]) -> tuple[int, list[str]]:
    """Check every block the guest reported against ``image`` (read while the guest is paused):
    its content must be the last record the guest reported for it, with that record's sha256,
    or the one record written after the last report. The blocks checked and what was wrong."""
    last: dict[int, Record] = {}
    for r in recs:
        if r.blk not in last or r.n > last[r.blk].n:
            last[r.blk] = r
    newest = max(r.n for r in recs)
    problems = []
    with open(image, "rb") as f:
        for blk, rec in sorted(last.items()):
            f.seek(blk * BLOCK)
            data = f.read(BLOCK)
            if hashlib.sha256(data).hexdigest() != rec.sha or data != block_content(rec.n, blk):
                in_flight = newest + 1
                if not (in_flight % BLOCKS == blk and data == block_content(in_flight, blk)):
                    problems.append(f"block {blk}: expected record {rec.n} (sha {rec.sha[:12]}), found {data[:32]!r}")
    return len(last), problems
