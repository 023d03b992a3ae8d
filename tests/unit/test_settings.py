"""One settings object: every variable typed, parsed once, bad values named, secrets masked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ferry_cli.runner import saga_timeouts
from ferry_common.settings import MASK, Settings, SettingsError, env_name, load_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith(("FERRY_", "OTEL_")) or name == "AMQP_URL":
            monkeypatch.delenv(name)


def test_defaults_without_any_variable() -> None:
    s = load_settings()
    assert s.amqp_url.get_secret_value() == "amqp://guest:guest@127.0.0.1:5672/"
    assert (s.driver, s.health_port, s.allowed_sources, s.capacity_mib) == ("sim", 8080, ("*",), None)
    assert s.trace_collect and s.amqp_coalesce and not s.libvirt_migrate_tls
    assert all(r["source"] == "default" for r in s.rows())


def test_variables_are_parsed_into_their_types(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "AMQP_URL": "amqps://ferry:s3cret@broker:5671/prod", "FERRY_HEALTH_PORT": "9090",
        "FERRY_ALLOWED_SOURCES": "host-a, host-b,", "FERRY_CAPACITY_MIB": "4096", "FERRY_DRIVER": "qemu",
        "FERRY_AMQP_COALESCE": "0", "FERRY_LIBVIRT_MIGRATE_TLS": "yes", "FERRY_SAGA_LEASE_S": "2.5",
        "FERRY_INVENTORY_INTERVAL_S": "0.5", "FERRY_LEDGER_MAX": "50", "FERRY_TRACE_COLLECT": "off",
        "OTEL_SDK_DISABLED": "true", "FERRY_AUTH": " ED25519 ", "FERRY_STATE_DIR": "",
        "FERRY_GC_THRESHOLD": "20000,20,50",
    }.items():
        monkeypatch.setenv(name, value)
    s = load_settings()
    assert s.amqp_url.get_secret_value() == "amqps://ferry:s3cret@broker:5671/prod"
    assert (s.health_port, s.allowed_sources, s.capacity_mib, s.driver) == (9090, ("host-a", "host-b"), 4096, "qemu")
    assert (s.amqp_coalesce, s.libvirt_migrate_tls, s.trace_collect, s.otel_sdk_disabled) == (False, True, False, True)
    assert (s.saga_lease_s, s.inventory_interval_s, s.ledger_max, s.auth) == (2.5, 0.5, 50, "ed25519")
    assert s.state_dir == ""  # '' is a value here: state in memory
    assert {r["variable"] for r in s.rows() if r["source"] == "env"} >= {"AMQP_URL", "FERRY_HEALTH_PORT", "FERRY_DRIVER"}


def test_an_empty_variable_means_unset_where_empty_is_no_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRY_CAPACITY_MIB", "")
    monkeypatch.setenv("FERRY_INVENTORY_INTERVAL_S", "")
    s = load_settings()
    assert (s.capacity_mib, s.inventory_interval_s) == (None, 1.0)


@pytest.mark.parametrize(("name", "value", "why"), [
    ("FERRY_HEALTH_PORT", "http", "valid integer"),
    ("FERRY_HEALTH_PORT", "70000", "less than or equal to 65535"),
    ("FERRY_DRIVER", "xen", "'sim', 'qemu' or 'libvirt'"),
    ("FERRY_AUTH", "hmac", "'ed25519'"),
    ("FERRY_SAGA_REPLY_S", "-1", "greater than 0"),
    ("FERRY_GC_THRESHOLD", "1,2", "three integers"),
    ("FERRY_TRACE_COLLECT", "maybe", "valid boolean"),
])
def test_an_invalid_value_names_its_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str, why: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert f"{name}={value!r}" in str(err.value)
    assert why in str(err.value)


def test_secrets_are_masked_everywhere_they_are_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMQP_URL", "amqps://ferry:s3cret@broker:5671/prod")
    monkeypatch.setenv("FERRY_STORE_URL", "postgresql://ferry:pg-pass@db:5432/ferry")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer tok")
    s = load_settings()
    shown = {r["variable"]: r["value"] for r in s.rows()}
    assert shown["AMQP_URL"] == f"amqps://ferry:{MASK}@broker:5671/prod"
    assert shown["FERRY_STORE_URL"] == f"postgresql://ferry:{MASK}@db:5432/ferry"
    assert shown["OTEL_EXPORTER_OTLP_HEADERS"] == MASK
    assert "s3cret" not in repr(s) and "pg-pass" not in str(shown) and "tok" not in str(shown)
    plain = {r["variable"]: r["value"] for r in load_settings(store_url="sqlite:///x.db").rows()}
    assert plain["FERRY_STORE_URL"] == "sqlite:///x.db"  # no password: shown as is


def test_modules_that_take_a_mapping_get_their_variables_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRY_AUTH", "ed25519")
    monkeypatch.setenv("FERRY_KEYS_DIR", "/keys")
    monkeypatch.setenv("FERRY_TRACE_COLLECT", "0")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    s = load_settings()
    assert s.signing_env() == {"FERRY_AUTH": "ed25519", "FERRY_KEYS_DIR": "/keys", "FERRY_AUTH_MAX_AGE_S": "300.0",
                               "FERRY_AUTH_MAX_SKEW_S": "30.0", "FERRY_AUTH_REPLAY_WINDOW": "100000"}
    assert s.tracing_env() == {"FERRY_TRACE_COLLECT": "0", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}


def test_the_saga_timeouts_come_from_the_settings() -> None:
    t = saga_timeouts(Settings(saga_lease_s=3, saga_reply_s=2, progress_interval_s=0))
    assert (t.lease_s, t.reply_s, t.progress_interval_s) == (3, 2, 0)
    default = saga_timeouts(Settings())
    assert default.status_poll_s == type(default)().status_poll_s


def test_every_variable_the_code_reads_is_a_setting() -> None:
    """A FERRY_*/OTEL_* name written in services/, libs/ or the CLI must be a field (the
    test-only variables of the harness are not settings)."""
    known = {env_name(f) for f in Settings.model_fields}
    seen: set[str] = set()
    for top in ("libs/common", "services", "apps/cli"):
        for path in (ROOT / top).rglob("*.py"):
            seen |= set(re.findall(r"\b((?:FERRY|OTEL)_[A-Z][A-Z0-9_]*[A-Z0-9])\b", path.read_text()))
    prefixes = {"FERRY_AMQP", "FERRY_AUTH", "OTEL_EXPORTER_OTLP"}  # "FERRY_AMQP_* files" in prose
    assert len(seen & known) >= 30  # the scan does find the variables
    assert sorted(seen - known - prefixes) == []
