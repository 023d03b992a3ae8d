"""What ``ferry service host`` hands the QEMU driver from the environment."""

from __future__ import annotations

import pytest

from ferry_cli.runner import _options
from ferry_common.settings import Settings


def test_the_qemu_driver_gets_its_standby_and_migration_tls_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRY_QEMU_STANDBY", "512:2=2")
    monkeypatch.setenv("FERRY_QEMU_TLS_DIR", "/etc/ferry/migration-tls")
    opts = _options(Settings(driver="qemu", state_dir=""), "host-a")
    assert opts.driver_options == {"standby": "512:2=2", "tls_dir": "/etc/ferry/migration-tls"}


def test_without_them_the_migration_stream_is_not_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FERRY_QEMU_STANDBY", raising=False)
    monkeypatch.delenv("FERRY_QEMU_TLS_DIR", raising=False)
    assert _options(Settings(driver="qemu", state_dir=""), "host-a").driver_options == {}
