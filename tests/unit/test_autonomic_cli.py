"""``ferry recommendations``, ``ferry automation set`` and ``ferry host fault`` against a fake
client: what they send, what they print, and bad input refused before anything is sent."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ferry_cli import main as cli
from ferry_cli import runtime
from ferry_common.bus.topology import COORDINATOR_QUERY
from ferry_common.messages.commands import Done
from ferry_common.messages.host_events import HostFaultEvent
from ferry_common.messages.recommendations import (
    ApplyRecommendation,
    ListRecommendations,
    MoveReason,
    Recommendation,
    RecommendationList,
    SetAutomationLevel,
)

REC = Recommendation(id="rec-1", vm_id="vm1", source_host="host-a", target_host="host-b",
                     reason=MoveReason(kind="load", policy="balance.load", level="manual",
                                       figures={"imbalance_before": 0.9}),
                     inventory_version="0123456789abcdef")


class FakeEndpoint:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    async def request(self, key: str, model: Any, *, timeout: float) -> Any:
        self.sent.append((key, model))
        if isinstance(model, ListRecommendations):
            return RecommendationList(recommendations=[REC], level="manual", leader="coordinator.x", imbalance=0.9)
        if isinstance(model, ApplyRecommendation):
            return Done(detail={"migration_id": "rec-abc", "vm_id": "vm1", "target_host": "host-b"})
        return Done(detail={})

    async def send(self, key: str, model: Any, **kw: Any) -> None:
        self.sent.append((key, model))


ENDPOINT = FakeEndpoint()


class FakeClient:
    timeout = 5.0
    endpoint = ENDPOINT


class FakeConnection:
    async def __aenter__(self) -> FakeClient:
        return FakeClient()

    async def __aexit__(self, *exc: object) -> None:
        return None


@pytest.fixture(autouse=True)
def fake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "connect", FakeConnection)
    ENDPOINT.sent.clear()


def test_recommendations_list_and_apply(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["recommendations", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recommendations"][0]["id"] == "rec-1" and out["level"] == "manual"
    assert cli.main(["recommendations"]) == 0
    assert "rec-1  vm1: host-a -> host-b" in capsys.readouterr().out
    assert cli.main(["recommendations", "apply", "rec-1"]) == 0
    assert "queued migration rec-abc of vm1 to host-b" in capsys.readouterr().out
    assert [(k, type(m)) for k, m in ENDPOINT.sent] == [
        (COORDINATOR_QUERY, ListRecommendations), (COORDINATOR_QUERY, ListRecommendations),
        (COORDINATOR_QUERY, ApplyRecommendation)]


def test_automation_level_is_checked_then_sent() -> None:
    assert cli.main(["automation", "set", "sometimes"]) == 2
    assert ENDPOINT.sent == []
    assert cli.main(["automation", "set", "partial"]) == 0
    [(key, msg)] = ENDPOINT.sent
    assert key == COORDINATOR_QUERY and isinstance(msg, SetAutomationLevel) and msg.level == "partial"


def test_host_fault_is_published_on_the_hosts_event_key() -> None:
    assert cli.main(["host", "fault", "host-a", "--kind", "smoke"]) == 2
    assert ENDPOINT.sent == []
    assert cli.main(["host", "fault", "host-a", "--kind", "disk", "--severity", "critical",
                     "--message", "SMART failing"]) == 0
    [(key, msg)] = ENDPOINT.sent
    assert key == "host.host-a.event" and isinstance(msg, HostFaultEvent)
    assert (msg.kind, msg.severity, msg.message) == ("disk", "critical", "SMART failing")
