"""The ``ferry`` command: tables and the live progress bar (rendered into a recording rich
console), ``--json`` for scripts, and errors for bad input."""

from __future__ import annotations

import json
from typing import Any

import pytest
from rich.console import Console

import ferry_cli.main as cli
from ferry_cli import runtime, views
from ferry_common.messages.public import MigrationStatusEvent
from ferry_common.settings import load_settings

ROWS: list[dict[str, Any]] = [{
    "migration_id": "m-1", "vm_id": "web-01", "source_host": "host-a", "target_host": "host-b",
    "status": "rolled_back", "created_at": 1_700_000_000.0, "data": {"reason": "denied by admission"},
    "history": [{"at": 10.0, "step": "admission", "event": "started", "detail": ""},
                {"at": 10.25, "step": "admission", "event": "failed", "detail": "denied"}],
}]
PLACEMENT = {"host-a": ["web-01"], "host-b": []}
SEEN = {
    "host-a": {"managed_object": {"planes": {"web-01": {"status": "active", "embots": {"load": {"count": 3}}}}},
               "sensor": {"vms": {"web-01": {"mode": "live", "queued": 0}}},
               "hypervisor_adapter": {"vms": {"web-01": "running"}}, "migration_policy": {}},
    "host-b": {"managed_object": {"planes": {}}, "sensor": {"vms": {}}, "hypervisor_adapter": {"vms": {}},
               "migration_policy": {}},
}


def recording(*, terminal: bool = False) -> Console:
    return Console(record=True, width=140, force_terminal=terminal, color_system=None)


def progress(percent: float, remaining_mib: int, dirty_pages: int = 0) -> MigrationStatusEvent:
    return MigrationStatusEvent(migration_id="m-1", vm_id="web-01", status="progress", step="migrate_vm", detail={
        "percent": percent, "remaining_bytes": remaining_mib * 2**20, "passes": 2, "dirty_pages_rate": dirty_pages})


def step(name: str) -> MigrationStatusEvent:
    return MigrationStatusEvent(migration_id="m-1", vm_id="web-01", status="progress", step=name)


DONE = MigrationStatusEvent(migration_id="m-1", vm_id="web-01", status="completed")


# ---- rendering -----------------------------------------------------------------------------
def test_migrations_render_as_a_table_with_each_steps_history() -> None:
    console = recording()
    views.migrations_table(console, ROWS)
    text = console.export_text()
    for cell in ("Migration", "m-1", "web-01", "host-a", "host-b", "rolled_back", "denied by admission", "0.250", "failed"):
        assert cell in text
    brief = recording()
    views.migrations_table(brief, ROWS, history=False)
    assert "m-1 steps" in text and "m-1 steps" not in brief.export_text()


def test_no_migrations_says_so() -> None:
    console = recording()
    views.migrations_table(console, [])
    assert console.export_text().strip() == "no migrations recorded"


def test_vm_show_renders_where_the_vm_and_its_plane_are() -> None:
    view = views.vm_view("web-01", PLACEMENT, SEEN)
    assert view == {"vm": "web-01", "runs_on": ["host-a"], "hosts": {"host-a": {
        "vm": "running", "plane": "active", "events": {"mode": "live", "queued": 0}, "embots": {"load": {"count": 3}}}}}
    console = recording()
    views.vm_table(console, view)
    text = console.export_text()
    assert "web-01: runs on host-a" in text
    assert all(cell in text for cell in ("running", "active", "live", "load", '{"count": 3}'))
    assert "host-b" not in text  # a host that knows nothing of the VM is left out


def test_the_migrate_bar_shows_step_percent_mib_left_and_dirty_rate() -> None:
    console = recording(terminal=True)
    with views.MigrateProgress(console) as shown:
        assert shown.live
        for e in (step("admission"), step("migrate_vm"), progress(42.5, 300, dirty_pages=2560), progress(97, 12), DONE):
            shown.update(e)
    text = console.export_text()
    assert "done admission" in text
    assert "300 MiB left" in text or "12 MiB left" in text
    assert "completed" in text and "100%" in text


def test_off_a_terminal_migrate_prints_one_plain_line_per_status() -> None:
    console = recording(terminal=False)
    with views.MigrateProgress(console) as shown:
        assert not shown.live
        for e in (step("admission"), progress(42.5, 300, dirty_pages=2560), DONE):
            shown.update(e)
    assert console.export_text().splitlines() == [
        "  admission",
        "  migrate_vm  pass 2  42.5%  300 MiB remaining  dirty 10.0 MiB/s",
        "completed",
    ]


def test_config_table_masks_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMQP_URL", "amqp://ferry:hunter2@broker/")
    console = recording()
    views.config_table(console, load_settings().rows())
    text = console.export_text()
    assert "AMQP_URL" in text and "FERRY_HEALTH_PORT" in text and "hunter2" not in text


# ---- the command and --json ----------------------------------------------------------------
class FakeClient:
    async def migrations(self, vm: str | None, limit: int) -> list[dict[str, Any]]:
        return [r for r in ROWS if vm in (None, r["vm_id"])][:limit]

    async def placement(self) -> dict[str, list[str]]:
        return PLACEMENT

    async def inspect(self, host: str, vm: str | None = None) -> dict[str, dict[str, Any]]:
        return SEEN[host]

    async def trace(self, migration_id: str) -> list[dict[str, Any]]:
        return [{"span_id": "s1", "name": "saga", "start": 0.0, "end": 0.5, "service": "coordinator"}]


class FakeConnection:
    async def __aenter__(self) -> FakeClient:
        return FakeClient()

    async def __aexit__(self, *exc: object) -> None:
        return None


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "connect", FakeConnection)


def test_migrations_json_is_the_records(fake: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["migrations", "--vm", "web-01", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == ROWS
    assert cli.main(["migrations", "--vm", "other", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_migrations_table_from_the_command(fake: None, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "160")  # rich's width off a terminal
    assert cli.main(["migrations", "--limit", "5"]) == 0
    out = capsys.readouterr().out
    assert "rolled_back" in out and "denied by admission" in out


def test_vm_show_json(fake: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["vm", "show", "web-01", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runs_on"] == ["host-a"]


def test_trace_json(fake: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["trace", "m-1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "saga"


def test_config_json_masks_and_reads_the_environment(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("AMQP_URL", "amqp://ferry:hunter2@broker/")
    monkeypatch.setenv("FERRY_HEALTH_PORT", "9999")
    assert cli.main(["config", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["AMQP_URL"] == "amqp://ferry:**********@broker/"
    assert shown["FERRY_HEALTH_PORT"] == 9999


def test_a_bad_variable_stops_the_command_with_its_name(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FERRY_HEALTH_PORT", "eighty")
    assert cli.main(["config"]) == 2
    assert "FERRY_HEALTH_PORT='eighty'" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["service", "nope"]) == 2
    assert cli.main(["migrate"]) == 2  # the VM is required (--to is not since issue 15: placement picks)
    assert cli.main(["events", "web-01", "--batch", "0"]) == 2
    assert cli.main(["--help"]) == 0


def test_keys_generate_writes_each_pair(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["keys", "generate", "--dir", str(tmp_path), "a", "b"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.key", "a.pub", "b.key", "b.pub"]
