"""``ferry hosts`` and ``ferry limits``: their tables, their JSON, and the limits changed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from rich.console import Console

from ferry_cli import main as cli
from ferry_cli import runtime, views

HOSTS = [
    {"host": "host-a", "driver": "sim", "capacity_mib": 8192, "used_mib": 2048, "reserved_mib": 0, "free_mib": 6144,
     "inbound": 0, "outbound": 1, "vms": 2, "labels": {"zone": "z1"}, "state": "ready"},
    {"host": "host-b", "driver": "sim", "capacity_mib": 8192, "used_mib": 0, "reserved_mib": 1024, "free_mib": 7168,
     "inbound": 1, "outbound": 0, "vms": 0, "labels": {}, "state": "cordoned"},
]


class FakeClient:
    def __init__(self) -> None:
        self.limits_asked: dict[str, Any] = {}

    async def hosts(self) -> list[dict[str, Any]]:
        return HOSTS

    async def limits(self, **changes: Any) -> dict[str, Any]:
        self.limits_asked = changes
        base = {"cluster": 5, "outbound_per_host": 2, "inbound_per_host": 2, "automatic": 1, "ageing_s": 600.0}
        if changes.get("cluster"):
            base["cluster"] = changes["cluster"]
        return {**base, "in_flight": 1, "queued": 3}


FAKE = FakeClient()


class FakeConnection:
    async def __aenter__(self) -> FakeClient:
        return FAKE

    async def __aexit__(self, *exc: object) -> None:
        return None


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "connect", FakeConnection)


def test_hosts_table_shows_state_use_and_migrations_in_flight() -> None:
    console = Console(record=True, width=160, color_system=None)
    views.hosts_table(console, HOSTS)
    text = console.export_text()
    for cell in ("host-a", "ready", "8192", "6144", "zone=z1", "host-b", "cordoned", "1024"):
        assert cell in text


def test_hosts_json(fake: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["hosts", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == HOSTS


def test_limits_shown_and_changed(fake: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "120")
    assert cli.main(["limits"]) == 0
    out = capsys.readouterr().out
    assert "cluster" in out and "queued" in out
    assert cli.main(["limits", "--cluster", "9", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cluster"] == 9
    assert FAKE.limits_asked == {"cluster": 9, "outbound": None, "inbound": None}
    assert cli.main(["limits", "--cluster", "0"]) == 2  # at least 1
