"""Guests a libvirt host already runs, adopted by Ferry and migrated with their disks.

Each domain here is defined by the test as an operator would (``virsh define``), outside Ferry;
Ferry adopts it with a management plane, migrates it persistent (defined on the target,
undefined on the source at the saga's end), with its disk shared or copied, and gives it back.
The Linux guest (``guest/linux``) boots once per session; the others are the tiny firmware guest.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ferry_cli.sample import MODULES, graph
from ferry_common.errors import RemoteError
from tests.harness import Cluster, inspect_problems, until

from . import linux_guest as lg
from .conftest import LIBVIRT_STATE
from .saga_support import CAPPED, host_options, progress_events, saga_cluster, wait_progress

pytestmark = [pytest.mark.libvirt, pytest.mark.rabbitmq]
HOSTS = {"host-a": "a", "host-b": "b"}  # Ferry host -> test daemon


def _conn(uri: str) -> Any:
    import libvirt

    return libvirt.open(uri)


def _forget(uri: str, name: str) -> None:
    """Destroy and undefine ``name`` on that daemon, if it is there."""
    import libvirt

    conn = _conn(uri)
    try:
        dom = conn.lookupByName(name)
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    except libvirt.libvirtError:
        pass
    finally:
        conn.close()


def _defined(uri: str, name: str) -> tuple[bool, bool]:
    """(defined persistently, running) of ``name`` on that daemon."""
    import libvirt

    conn = _conn(uri)
    try:
        dom = conn.lookupByName(name)
        return bool(dom.isPersistent()), bool(dom.isActive())
    except libvirt.libvirtError:
        return False, False
    finally:
        conn.close()


@pytest.fixture(scope="session")
def daemon_dirs(libvirt_daemons: dict[str, str]) -> dict[str, str]:
    """The directories a Debian host has (images, console logs), in each daemon's own view."""
    for d in HOSTS.values():
        (LIBVIRT_STATE / d / "lib" / "images").mkdir(parents=True, exist_ok=True)
        (LIBVIRT_STATE / d / "log" / "qemu").mkdir(parents=True, exist_ok=True)
    return libvirt_daemons


@dataclass
class LinuxDomain:
    name: str
    disk: str  # the path in the daemons' view
    console: str


@pytest.fixture(scope="session")
def linux_domain(daemon_dirs: dict[str, str]) -> Iterator[LinuxDomain]:
    """The Linux guest defined and started on daemon a (once per session), its disk local there."""
    files = lg.build()
    name = f"lx-{uuid.uuid4().hex[:6]}"
    dom = LinuxDomain(name, f"{lg.IMAGES}/{name}.raw", f"{lg.CONSOLES}/{name}-serial.log")
    shutil.copyfile(files / "disk.raw", lg.on_host("a", dom.disk))
    conn = _conn(daemon_dirs["a"])
    conn.defineXML(lg.domain_xml(name, files, dom.disk, dom.console)).create()
    conn.close()
    yield dom
    for d in HOSTS.values():
        _forget(daemon_dirs[d], name)
        lg.on_host(d, dom.disk).unlink(missing_ok=True)
        lg.on_host(d, dom.console).unlink(missing_ok=True)


@pytest.fixture
async def cluster(guest_image: Path, daemon_dirs: dict[str, str], rabbitmq_available: None) -> AsyncIterator[Cluster]:
    base = Path(tempfile.mkdtemp(prefix="fad-", dir="/tmp"))
    opts = host_options("libvirt", {
        h: {"uri": daemon_dirs[d], "run_dir": str(base / d), "guest_image": str(guest_image)} for h, d in HOSTS.items()
    })
    async with saga_cluster(opts) as c:
        yield c
    shutil.rmtree(base, ignore_errors=True)


class TinyDomains:
    """Operator-defined domains of the tiny firmware guest, forgotten on both daemons afterwards."""

    def __init__(self, uris: dict[str, str], image: Path) -> None:
        self.uris, self.image, self.names, self.files = uris, image, [], []

    def define(self, *, start: bool = True, devices: str = "", cpu: str = "", cmdline: str = "",
               disk: str | None = None, disk_mib: int = 8) -> str:
        name = f"ad-{uuid.uuid4().hex[:8]}"
        self.names.append(name)
        if disk is not None:
            disk = disk.format(name=name)
            local = lg.on_host("a", disk)
            local.parent.mkdir(parents=True, exist_ok=True)
            with open(local, "wb") as f:
                f.truncate(disk_mib << 20)
            self.files += [lg.on_host(d, disk) for d in HOSTS.values()]
            devices += (f"<disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/>"
                        f"<source file='{disk}'/><target dev='vda' bus='virtio'/></disk>")
        xml = f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{self.image}</kernel><cmdline>{cmdline}</cmdline></os>{cpu}
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>{devices}
  <controller type='usb' model='none'/><memballoon model='none'/></devices></domain>"""
        conn = _conn(self.uris["a"])
        dom = conn.defineXML(xml)
        if start:
            dom.create()
        conn.close()
        return name

    def cleanup(self) -> None:
        for name in self.names:
            for uri in self.uris.values():
                _forget(uri, name)
        for f in self.files:
            f.unlink(missing_ok=True)


@pytest.fixture
def tiny(daemon_dirs: dict[str, str], guest_image: Path) -> Iterator[TinyDomains]:
    t = TinyDomains(daemon_dirs, guest_image)
    yield t
    t.cleanup()


async def adopt(c: Cluster, name: str, storage: str = "shared") -> str:
    spec = await c.client.adopt_vm("host-a", name, lambda vm_id: graph(vm_id, extra_elements=4), MODULES,
                                   storage=storage)  # type: ignore[arg-type]
    await c.wait_placement(spec.vm_id, "host-a")
    return spec.vm_id


async def test_inventory_lists_adoptable_domains_and_adoption_takes_one(cluster: Cluster, tiny: TinyDomains) -> None:
    name = tiny.define()
    stopped = tiny.define(start=False)

    def adoptable() -> dict[str, str]:
        inv = cluster.coordinator.hosts.hosts.get("host-a")
        return {a.name: a.state for a in inv.adoptable} if inv else {}

    async def listed() -> bool:
        return adoptable().get(name) == "running" and adoptable().get(stopped) == "shutoff"

    await until(listed, 10.0, "the inventory to list both defined domains as adoptable")
    vm_id = await adopt(cluster, name)
    assert vm_id == name
    assert name not in adoptable() or not await listed()
    spec = cluster.coordinator.hosts.locate(name)
    assert spec is not None and spec[1].params["adopted"] and spec[1].params["storage"] == "shared"
    await cluster.send_events(name, 5)
    assert await inspect_problems(cluster, name, "host-a") == []
    # by UUID too, and adopting again changes nothing
    conn = _conn(tiny.uris["a"])
    by_uuid = conn.lookupByName(stopped).UUIDString()
    conn.close()
    again = await cluster.client.adopt_vm("host-a", name, graph, MODULES)
    assert again.vm_id == name
    adopted = await cluster.host("host-a").adapter.driver.adopt(by_uuid)
    assert adopted[0].vm_id == stopped and adopted[1] is False


async def test_linux_guest_migrates_with_its_disk_copied(cluster: Cluster, linux_domain: LinuxDomain) -> None:
    """The Linux guest, adopted with its local disk in copy mode, moves to host-b: its counter
    goes on there from where it stopped, in the same boot with its uptime unbroken, and every
    block it wrote is on the target's disk as it reported writing it. Then it is released."""
    name, uris = linux_domain.name, {h: cluster.host(h).adapter.driver.uri for h in HOSTS}
    source_console = lg.on_host("a", linux_domain.console)
    target_console = lg.on_host("b", linux_domain.console)

    async def booted() -> bool:
        return source_console.exists() and len(lg.records(source_console.read_text())) >= 3

    await until(booted, 60.0, "the Linux guest to boot and write records")
    vm_id = await adopt(cluster, name, storage="copy")
    await cluster.send_events(vm_id, 10)
    mid = await cluster.client.migrate(vm_id, "host-b")
    outcome = await cluster.client.outcome(mid, timeout=120)
    assert outcome.status == "completed", outcome

    # persistent on the target, undefined on the source once the saga completed
    assert _defined(uris["host-b"], name) == (True, True)
    assert _defined(uris["host-a"], name) == (False, False)
    # the disk copy's progress was published
    samples = progress_events(cluster, mid)
    assert any(s.get("disk_total_bytes", 0) >= 32 << 20 for s in samples), samples[:3]
    assert samples[-1]["disk_transferred_bytes"] >= 32 << 20
    # the counter goes on on the target
    before = lg.records(target_console.read_text()) if target_console.exists() else []

    async def advancing() -> bool:
        return len(lg.records(target_console.read_text())) >= len(before) + 3

    await until(advancing, 30.0, "the guest's counter to advance on the target")
    # the serial stream, source's then target's, is one unbroken run: every record once, in
    # order, one boot, uptime rising with no reset
    stream = lg.records(source_console.read_text() + target_console.read_text())
    on_source = lg.records(source_console.read_text())
    assert on_source and len(stream) > len(on_source), "no records on one of the hosts"
    assert [r.n for r in stream] == list(range(1, len(stream) + 1))
    assert {r.boot for r in stream} == {stream[0].boot}
    steps = [b.up - a.up for a, b in zip(stream, stream[1:], strict=False)]
    assert min(steps) > 0 and max(steps) < 10, (min(steps), max(steps))

    # the disk on the target holds every block as the guest reported writing it
    conn = _conn(uris["host-b"])
    dom = conn.lookupByName(name)
    dom.suspend()
    try:
        recs = lg.records(source_console.read_text() + target_console.read_text())
        checked, problems = lg.disk_problems(lg.on_host("b", linux_domain.disk), recs)
        assert problems == [] and checked >= min(len(recs), lg.BLOCKS)
        assert any(r.n <= on_source[-1].n for r in recs)  # blocks written on the source are among them
    finally:
        dom.resume()
        conn.close()
    await cluster.send_events(vm_id, 5)
    assert await inspect_problems(cluster, vm_id, "host-b") == []

    # given back: no longer managed, still running and defined on host-b
    await cluster.client.release_vm("host-b", vm_id)
    assert _defined(uris["host-b"], name) == (True, True)

    async def unmanaged() -> bool:
        inv = cluster.coordinator.hosts.hosts.get("host-b")
        return inv is not None and vm_id not in [v.vm_id for v in inv.vms] and name in [a.name for a in inv.adoptable]

    await until(unmanaged, 10.0, "host-b's inventory to list the released guest as adoptable")
    seen = await cluster.client.inspect("host-b", vm_id)
    assert vm_id not in seen["managed_object"]["planes"] and vm_id not in seen["sensor"]["vms"]


async def test_rollback_leaves_the_domain_defined_on_the_source(cluster: Cluster, tiny: TinyDomains) -> None:
    """A copy-mode migration cancelled mid-way (a release meanwhile is refused): the guest runs
    on host-a, still defined and managed there; host-b has no domain and no disk left."""
    disk = f"{lg.IMAGES}/{{name}}.raw"
    name = tiny.define(cmdline="dirty_mib=64 rate_mibps=0", disk=disk)
    vm_id = await adopt(cluster, name, storage="copy")
    mid = await cluster.client.migrate(vm_id, "host-b", params={**CAPPED, "completion_timeout_min_s": 120})
    await wait_progress(cluster, mid)
    assert lg.on_host("b", disk.format(name=name)).exists(), "the target's disk was not created"
    with pytest.raises(RemoteError, match="is migrating"):  # not given back half-way
        await cluster.client.release_vm("host-a", vm_id)
    await cluster.client.cancel(mid)
    outcome = await cluster.client.outcome(mid, timeout=60)
    assert outcome.status == "rolled_back", outcome
    uris = {h: cluster.host(h).adapter.driver.uri for h in HOSTS}
    assert _defined(uris["host-a"], name) == (True, True)
    assert _defined(uris["host-b"], name) == (False, False)
    assert not lg.on_host("b", disk.format(name=name)).exists(), "the target's disk was left behind"
    assert any(v.vm_id == vm_id for v in await cluster.host("host-a").adapter.driver.list())
    assert await inspect_problems(cluster, vm_id, "host-a") == []


async def test_shared_storage_moves_the_memory_only(cluster: Cluster, tiny: TinyDomains) -> None:
    """A disk both daemons see at one path: the guest moves, nothing of its disk is copied,
    and the target's domain runs on the same file."""
    path = f"{LIBVIRT_STATE}/shared/{{name}}.raw"
    name = tiny.define(cmdline="dirty_mib=8 rate_mibps=16", disk=path)
    vm_id = await adopt(cluster, name, storage="shared")
    mid = await cluster.client.migrate(vm_id, "host-b")
    outcome = await cluster.client.outcome(mid, timeout=60)
    assert outcome.status == "completed", outcome
    driver = cluster.host("host-b").adapter.driver
    assert _defined(driver.uri, name) == (True, True)
    assert _defined(cluster.host("host-a").adapter.driver.uri, name) == (False, False)
    samples = progress_events(cluster, mid)
    assert samples and all(s.get("disk_total_bytes", 0) == 0 for s in samples), samples
    moved = next(v for v in await driver.list() if v.vm_id == vm_id)
    assert [d["path"] for d in moved.params["disks"]] == [path.format(name=name)]
    assert await inspect_problems(cluster, vm_id, "host-b") == []


async def _rejected(c: Cluster, vm_id: str, code: str) -> None:
    mid = await c.client.migrate(vm_id, "host-b")
    outcome = await c.client.outcome(mid, timeout=60)
    assert outcome.status == "rejected" and outcome.code == code, outcome
    rec = await c.store.get(mid)
    assert rec is not None and [h.step for h in rec.history if h.event == "started"] == ["admission"]
    assert _defined(c.host("host-b").adapter.driver.uri, vm_id) == (False, False)
    assert await c.host("host-a").adapter.driver.state(vm_id) == "running"


async def test_admission_refuses_a_cpu_model_the_target_lacks(cluster: Cluster, tiny: TinyDomains) -> None:
    # TCG cannot provide SandyBridge's features (usable='no'); check='none' lets the source run it
    cpu = "<cpu mode='custom' match='exact' check='none'><model fallback='forbid'>SandyBridge</model></cpu>"
    name = tiny.define(cpu=cpu)
    await _rejected(cluster, await adopt(cluster, name), "cpu_unsupported")


async def test_admission_refuses_a_shared_disk_missing_on_the_target(cluster: Cluster, tiny: TinyDomains) -> None:
    # under /var/lib/libvirt each daemon sees its own files: this disk is on host-a only
    name = tiny.define(disk=f"{lg.IMAGES}/{{name}}.raw")
    await _rejected(cluster, await adopt(cluster, name, storage="shared"), "disk_missing")


async def test_admission_refuses_a_shared_disk_whose_directory_is_not_shared(cluster: Cluster, tiny: TinyDomains) -> None:
    # the same path on both hosts, two different files: a probe made by host-b's daemon in the
    # directory is not seen by host-a's, so the guest would run on host-b from another disk
    disk = f"{lg.IMAGES}/{{name}}.raw"
    name = tiny.define(disk=disk)
    twin = lg.on_host("b", disk.format(name=name))
    twin.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(lg.on_host("a", disk.format(name=name)), twin)
    await _rejected(cluster, await adopt(cluster, name, storage="shared"), "disk_not_shared")


async def test_admission_refuses_to_copy_over_a_disk_the_target_has(cluster: Cluster, tiny: TinyDomains) -> None:
    # a directory both daemons see: copying would overwrite the source's own disk
    shared = LIBVIRT_STATE / "shared"
    name = tiny.define(disk=f"{shared}/{{name}}.raw")
    await _rejected(cluster, await adopt(cluster, name, storage="copy"), "disk_exists")


async def test_admission_refuses_a_host_device(cluster: Cluster, tiny: TinyDomains) -> None:
    """A guest with a PCI device passed through in its definition (attached with --config: no
    device here can be given to a running guest, there is no USB bus and no VFIO). Migrated,
    that definition would go to host-b, where the device is not."""
    import libvirt

    hostdev = ("<hostdev mode='subsystem' type='pci' managed='yes'><source>"
               "<address domain='0x0000' bus='0x00' slot='0x1f' function='0x0'/></source></hostdev>")
    name = tiny.define()
    conn = _conn(tiny.uris["a"])
    conn.lookupByName(name).attachDeviceFlags(hostdev, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    conn.close()
    vm_id = await adopt(cluster, name)
    await _rejected(cluster, vm_id, "host_device")
    rec = (await cluster.client.migrations(vm_id))[0]
    assert "cannot be migrated" in str(rec["data"]["reason"]), rec["data"]


def test_block_content_matches_the_guest_script() -> None:
    """The record format the disk check rebuilds is the one init.sh writes."""
    init = (lg.REPO / "guest" / "linux" / "init.sh").read_text()
    assert "printf 'ferry seq=%010d blk=%06d\\n'" in init and "head -n 128" in init
    assert len(lg.block_content(7, 7)) == lg.BLOCK
    assert hashlib.sha256(lg.block_content(1, 1)).hexdigest().startswith("caf6c836")  # seen from the guest
