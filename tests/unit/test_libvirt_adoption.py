"""What needs no libvirt daemon in adopting guests: reading a domain definition, the stall watch
across a disk copy, and the plane file an operator gives ``ferry vm adopt``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ferry_cli.adopt import load_plane
from ferry_cli.sample import MODULES, graph
from ferry_hypervisor_adapter.drivers.base import MigrationParams, MigrationProgress
from ferry_hypervisor_adapter.drivers.libvirt import _watched
from ferry_hypervisor_adapter.drivers.libvirt_domains import describe
from ferry_hypervisor_adapter.drivers.precopy import PrecopyWatch

DOMAIN = """<domain type='qemu'><name>db-1</name><vcpu placement='static'>2</vcpu>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>
  <cpu mode='custom' match='exact'><model fallback='forbid'>Westmere</model></cpu>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/var/lib/libvirt/images/db.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/sdb'/><target dev='vdb' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><source file='/iso/install.iso'/><target dev='hdc' bus='ide'/><readonly/></disk>
    <disk type='file' device='disk'><source file='/shared/quorum.raw'/><target dev='vdc' bus='virtio'/><shareable/></disk>
    <hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' bus='0x03' slot='0x00' function='0x1'/></source></hostdev>
  </devices></domain>"""


def test_describe_reads_what_admission_and_migration_need() -> None:
    facts = describe(DOMAIN)
    assert facts["disks"] == [
        {"target": "vda", "path": "/var/lib/libvirt/images/db.qcow2", "type": "file", "format": "qcow2",
         "cache": "default"},
        {"target": "vdb", "path": "/dev/sdb", "type": "block", "format": "raw", "cache": "default"},
    ]  # the CD-ROM and the shareable disk are not the migration's to carry
    assert facts["hostdevs"] == ["pci 0x03:0x0000:0x1:0x00"]
    assert facts["cpu"] == {"mode": "custom", "model": "Westmere"}
    assert (facts["vcpus"], facts["machine"], facts["domain_type"]) == (2, "pc-i440fx-7.2", "qemu")


def test_a_disk_copy_phase_does_not_count_against_the_memory_phase() -> None:
    """libvirt copies disks first, down to 0 bytes left; the memory phase that follows starts
    high. The stall count starts again with it instead of waiting for a new low under 0."""
    now = [0.0]
    watch = PrecopyWatch(MigrationParams(stall_timeout_s=5, completion_timeout_min_s=600), 128, clock=lambda: now[0])
    for t, sample in ((0.0, MigrationProgress("active", disk_total_bytes=100, disk_remaining_bytes=100)),
                      (1.0, MigrationProgress("active", disk_total_bytes=100, disk_remaining_bytes=0)),
                      (2.0, MigrationProgress("active", total_bytes=1000, remaining_bytes=900, disk_total_bytes=100))):
        now[0] = t
        watch.observe(*_watched(sample))
    now[0] = 6.5  # 5.5 s after the disk's low, 4.5 s into the memory phase
    assert watch.expired() is None
    now[0] = 7.5
    assert (watch.expired() or "").startswith("stall timeout")


def test_plane_file_is_checked_and_names_the_file(tmp_path: Path) -> None:
    good = tmp_path / "plane.json"
    good.write_text(json.dumps({"graph": graph("db-1").model_dump(mode="json"),
                                "modules": [m.model_dump(mode="json") for m in MODULES]}))
    plane, modules = load_plane(str(good))
    assert plane("db-1").vm_id == "db-1" and len(modules) == len(MODULES)
    with pytest.raises(ValueError, match="not 'web-2'"):
        plane("web-2")

    broken = tmp_path / "broken.json"
    broken.write_text('{"graph":\n  {"vm_id": }')
    with pytest.raises(ValueError, match=r"broken.json: line 2"):
        load_plane(str(broken))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"graph": {"vm_id": "db-1", "elements": "none"}}))
    with pytest.raises(ValueError, match=r"wrong.json: graph.elements"):
        load_plane(str(wrong))
    with pytest.raises(ValueError, match="missing.json"):
        load_plane(str(tmp_path / "missing.json"))
    sample, _ = load_plane("sample")
    assert sample("x-1").vm_id == "x-1"


def test_cli_adopt_refuses_a_bad_plane_file_before_reaching_any_host(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from ferry_cli.main import main

    assert main(["vm", "adopt", "db-1", "--on", "host-a", "--plane", str(tmp_path / "nope.json")]) == 2
    assert "nope.json" in capsys.readouterr().err
