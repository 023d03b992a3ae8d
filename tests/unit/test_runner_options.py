"""What ``ferry service host`` hands the QEMU and libvirt drivers from the environment."""

from __future__ import annotations

import pytest

from ferry_cli.runner import _options
from ferry_common.settings import Settings


def test_the_qemu_driver_gets_its_standby_and_migration_tls_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRY_QEMU_STANDBY", "512:2=2")
    monkeypatch.setenv("FERRY_QEMU_TLS_DIR", "/etc/ferry/migration-tls")
    opts = _options(Settings(driver="qemu", state_dir=""), "host-a")
    assert opts.driver_options == {"standby": "512:2=2", "tls_dir": "/etc/ferry/migration-tls"}


def test_the_libvirt_driver_migrates_over_tls_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRY_LIBVIRT_MIGRATE_TLS", "1")
    monkeypatch.setenv("FERRY_QEMU_TLS_DIR", "/etc/ferry/migration-tls")  # the qemu driver's, not this one's
    assert _options(Settings(driver="libvirt", state_dir=""), "host-a").driver_options == {"tls": True}
    monkeypatch.setenv("FERRY_LIBVIRT_MIGRATE_TLS", "0")
    assert _options(Settings(driver="libvirt", state_dir=""), "host-a").driver_options == {}


def test_host_labels_from_the_environment() -> None:
    from ferry_cli.runner import host_labels

    assert host_labels("zone=a, disk=ssd,") == {"zone": "a", "disk": "ssd"}
    assert host_labels("") == {}
    with pytest.raises(ValueError):
        host_labels("zone")
