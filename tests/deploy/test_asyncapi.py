"""docs/asyncapi.yaml is what ferry_common.messages.contract generates, and the check says so.

The document is generated (scripts/gen_asyncapi.py) from the channel declaration and the
pydantic models of the message registry; ``make lint`` runs the same check.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ferry_common.bus import topology
from ferry_common.messages import REGISTRY
from ferry_common.messages.contract import CHANNELS, asyncapi
from ferry_common.messages.public import STEPS, MigrationStatusEvent

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gen_asyncapi.py"
DOC = ROOT / "docs" / "asyncapi.yaml"


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--path", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_committed_document_is_current() -> None:
    proc = check(DOC)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("maxItems: 1000", "maxItems: 999"),  # a model's limit changed, the document not
        ("  alarm.{vm_id}:", "  alarms.{vm_id}:"),  # a channel renamed by hand
    ],
)
def test_a_stale_document_fails_the_check(tmp_path: Path, old: str, new: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    assert old in text
    stale = tmp_path / "asyncapi.yaml"
    stale.write_text(text.replace(old, new, 1), encoding="utf-8")
    proc = check(stale)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert any(line.startswith("-") and new in line for line in lines), proc.stderr
    assert any(line.startswith("+") and old in line for line in lines), proc.stderr
    assert "is stale" in proc.stderr


def test_a_missing_document_fails_the_check(tmp_path: Path) -> None:
    assert check(tmp_path / "absent.yaml").returncode == 1


def test_channels_come_from_the_topology_and_messages_from_the_registry() -> None:
    doc = asyncapi()
    assert set(doc["channels"]) == {
        topology.MIGRATION_REQUESTED,
        topology.MIGRATION_CANCEL,
        topology.migration_status("{status}"),
        topology.vm_events("{vm_id}"),
        topology.alarm("{vm_id}"),
        # host drain and maintenance (issue 15)
        topology.HOST_DRAIN_REQUEST,
        topology.HOST_DRAIN_CANCEL,
        topology.HOST_UNCORDON,
        topology.drain_status("{host}", "{status}"),
    }
    for ch in CHANNELS:
        for name in ch.messages:
            assert name in REGISTRY
            payload = doc["components"]["messages"][name]["payload"]
            assert set(payload["properties"]) == set(REGISTRY[name].model_fields)
    assert yaml.safe_load(DOC.read_text(encoding="utf-8")) == doc


def test_every_step_the_coordinator_runs_is_in_the_contract() -> None:
    from ferry_coordinator.saga import STEPS as RUN_ORDER

    assert set(RUN_ORDER) <= set(STEPS)
    status = asyncapi()["components"]["messages"]["MigrationStatusEvent"]["payload"]
    assert status["properties"]["step"]["anyOf"][0]["enum"] == list(STEPS)
    # documented, not enforced: a newer coordinator's step does not break an older client
    assert MigrationStatusEvent(migration_id="m", vm_id="v", status="progress", step="new_step").step == "new_step"
