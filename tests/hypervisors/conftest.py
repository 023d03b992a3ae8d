"""Fixtures for the hypervisor tests: the test guest, driver pairs (sim, QEMU, libvirt), libvirt daemons.

Missing QEMU or libvirt makes these tests fail, not skip, so CI notices; set
``FERRY_SKIP_HYPERVISORS=1`` to skip them on a machine that cannot run them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ferry_common.messages.domain import VmSpec
from ferry_hypervisor_adapter.drivers.base import (
    MigrationParams,
    MigrationProgress,
    MigrationResult,
)
from ferry_hypervisor_adapter.drivers.guest import GuestStatus, build_guest

REPO = Path(__file__).resolve().parents[2]
DAEMONS = REPO / "scripts" / "libvirt-daemons.sh"
LIBVIRT_STATE = Path(os.environ.get("FERRY_LIBVIRT_STATE", "/tmp/ferry-libvirt"))
HOW_TO_FIX = "run scripts/ensure-hypervisors.sh, or set FERRY_SKIP_HYPERVISORS=1 to skip"


def require(what: str, present: bool) -> None:
    """Skip when asked to, else fail loudly when a hypervisor piece is missing."""
    if os.environ.get("FERRY_SKIP_HYPERVISORS") == "1":
        pytest.skip("FERRY_SKIP_HYPERVISORS=1")
    if not present:
        pytest.fail(f"{what} is missing: {HOW_TO_FIX}", pytrace=False)


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@pytest.fixture(scope="session")
def guest_image() -> Path:
    """The dirtying guest, built by its Makefile (a no-op when up to date)."""
    require("gcc/ld/make", all(shutil.which(b) for b in ("gcc", "ld", "make")))
    return build_guest()


@dataclass
class Pair:
    """A source and a target driver (two simulated hosts) and how to kill the target's guest."""

    source: Any
    target: Any
    kill_target: Callable[[str], None]
    kind: str = ""
    vm_ids: set[str] = field(default_factory=set)

    def spec(self, memory_mib: int = 128, dirty_mib: int = 0, rate_mibps: int = 0) -> VmSpec:
        """A fresh guest spec, torn down on both hosts after the test."""
        spec = VmSpec(
            vm_id=f"t-{uuid.uuid4().hex[:8]}",
            memory_mib=memory_mib,
            driver=self.kind,
            params={"guest_dirty_mib": dirty_mib, "guest_rate_mibps": rate_mibps},
        )
        self.vm_ids.add(spec.vm_id)
        return spec

    async def teardown(self) -> None:
        for driver in (self.source, self.target):
            for vm_id in self.vm_ids:
                await driver.destroy(vm_id)
            await driver.close()

    async def migrate_new_guest(self) -> tuple[str, MigrationResult]:
        """Start an idle guest on the source and migrate it to the target with the default
        parameters; its id and how the migration ended."""
        spec = VmSpec(vm_id=f"t-{uuid.uuid4().hex[:8]}", memory_mib=128, driver=self.kind)
        self.vm_ids.add(spec.vm_id)
        await self.source.create(spec)
        await self.wait_booted(self.source, spec.vm_id)
        params = MigrationParams()
        uri = await self.target.prepare_incoming(spec, params)

        async def ignore(_: MigrationProgress) -> None:
            pass

        return spec.vm_id, await self.source.migrate(spec.vm_id, uri, params, ignore)

    async def wait_booted(self, driver: Any, vm_id: str, timeout_s: float = 10.0) -> GuestStatus:
        """Wait until the guest's status block is valid (it has booted)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            status: GuestStatus = await driver.guest_status(vm_id)
            if status.valid and status.heartbeat > 0:
                return status
            if loop.time() > deadline:
                raise AssertionError(f"guest {vm_id} did not boot: {status}")
            await asyncio.sleep(0.05)

    async def advancing(self, driver: Any, vm_id: str, wait_s: float = 0.3) -> bool:
        """True if the guest's heartbeat moves (its vCPU runs on that host)."""
        before = await driver.guest_status(vm_id)
        await asyncio.sleep(wait_s)
        after = await driver.guest_status(vm_id)
        return bool(after.heartbeat != before.heartbeat)


def _kill_pid(pid: int | None) -> None:
    assert pid is not None, "no process to kill"
    os.kill(pid, signal.SIGKILL)


def require_qemu() -> None:
    require("qemu-system-x86_64", shutil.which("qemu-system-x86_64") is not None)
    require("qemu.qmp (pip)", _importable("qemu.qmp"))


def short_dir(prefix: str) -> Path:
    """A run directory under /tmp: QMP unix socket paths are limited to 107 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@pytest.fixture
async def qemu_pair(guest_image: Path) -> AsyncIterator[Pair]:
    require_qemu()
    from ferry_hypervisor_adapter.drivers.qemu import QemuDriver

    base = short_dir("fq-")
    source = QemuDriver("host-a", run_dir=base / "a", guest_image=guest_image)
    target = QemuDriver("host-b", run_dir=base / "b", guest_image=guest_image)
    await source.start()
    await target.start()
    pair = Pair(source, target, lambda vm_id: _kill_pid(target.pid(vm_id)), "qemu")
    yield pair
    await pair.teardown()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def libvirt_daemons() -> Iterator[dict[str, str]]:
    """Two libvirt daemons (hosts ``a`` and ``b``); stopped afterwards if this session started them."""
    require("libvirtd", shutil.which("libvirtd") is not None)
    require("libvirt-python (pip)", _importable("libvirt"))
    env = {**os.environ, "FERRY_LIBVIRT_STATE": str(LIBVIRT_STATE)}
    was_running = subprocess.run([DAEMONS, "status"], env=env, capture_output=True).returncode == 0
    started = subprocess.run([DAEMONS, "start"], env=env, capture_output=True, text=True)
    if started.returncode != 0:
        pytest.fail(f"libvirt daemons did not start:\n{started.stdout}\n{started.stderr}")
    uris = {
        h: subprocess.run(
            [DAEMONS, "uri", h], env=env, capture_output=True, text=True, check=True
        ).stdout.strip()
        for h in ("a", "b")
    }
    yield uris
    if not was_running:
        subprocess.run([DAEMONS, "stop"], env=env, capture_output=True)


def _libvirt_qemu_pid(host: str, vm_id: str) -> int | None:
    from ferry_hypervisor_adapter.drivers.libvirt import domain_name

    pidfile = LIBVIRT_STATE / host / "run" / "qemu" / f"{domain_name(vm_id)}.pid"
    return int(pidfile.read_text()) if pidfile.exists() else None


@pytest.fixture
async def libvirt_pair(guest_image: Path, libvirt_daemons: dict[str, str]) -> AsyncIterator[Pair]:
    from ferry_hypervisor_adapter.drivers.libvirt import LibvirtDriver

    base = Path(tempfile.mkdtemp(prefix="fl-", dir="/tmp"))
    source = LibvirtDriver(
        "host-a", uri=libvirt_daemons["a"], run_dir=base / "a", guest_image=guest_image
    )
    target = LibvirtDriver(
        "host-b", uri=libvirt_daemons["b"], run_dir=base / "b", guest_image=guest_image
    )
    await source.start()
    await target.start()
    pair = Pair(source, target, lambda vm_id: _kill_pid(_libvirt_qemu_pid("b", vm_id)), "libvirt")
    yield pair
    await pair.teardown()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def sim_pair() -> AsyncIterator[Pair]:
    """Two simulated hosts on one simulated network, so a migration sees its target die."""
    from ferry_hypervisor_adapter.drivers.sim import SimDriver, SimNetwork

    network = SimNetwork()
    source = SimDriver("host-a", network=network)
    target = SimDriver("host-b", network=network)
    await source.start()
    await target.start()
    pair = Pair(source, target, target.kill, "sim")
    yield pair
    await pair.teardown()


@pytest.fixture(
    params=[
        "sim",
        pytest.param("qemu", marks=pytest.mark.qemu),
        pytest.param("libvirt", marks=pytest.mark.libvirt),
    ]
)
def driver_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def pair(driver_kind: str, request: pytest.FixtureRequest) -> Pair:
    """The source/target pair of the driver under test."""
    found: Pair = request.getfixturevalue(f"{driver_kind}_pair")
    return found
