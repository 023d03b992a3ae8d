"""Automation levels, recommendations and their superseding, through the round the coordinator runs."""

from __future__ import annotations

import pytest

from ferry_common.clock import FakeClock
from ferry_common.messages import decode, encode, model_for
from ferry_common.messages.host_events import HostFaultEvent
from ferry_common.messages.recommendations import AutomationLevel, RecommendationEvent
from ferry_coordinator.balance import (
    AutomationPolicy,
    BalanceCycle,
    Balancer,
    BalanceRules,
    CapacityPlacement,
    Move,
    Proposal,
    RecommendationBook,
    RecommendationError,
    decide,
    inventory_version,
)
from tests.unit.balance_fixtures import fleet, lopsided, vm


def cycle(level: AutomationLevel, per_vm: dict[str, AutomationLevel] | None = None) -> BalanceCycle:
    clock = FakeClock()
    rules = BalanceRules(hold_rounds=1)
    return BalanceCycle(Balancer(CapacityPlacement(), rules, clock), AutomationPolicy(level, per_vm or {}),
                        RecommendationBook(clock))


def fault_move() -> Proposal:
    return Proposal(Move("w1", "h2", "h3"), 0.0, 0.0, 0.1, 0.1, kind="fault", policy="host.fault.disk")


@pytest.mark.parametrize(("level", "kind", "decision"), [
    ("manual", "load", "recommend"), ("manual", "fault", "recommend"), ("manual", "maintenance", "recommend"),
    ("partial", "load", "recommend"), ("partial", "fault", "act"), ("partial", "maintenance", "act"),
    ("full", "load", "act"), ("full", "fault", "act"), ("full", "maintenance", "act"),
])
def test_decision_table(level: AutomationLevel, kind: str, decision: str) -> None:
    assert decide(level, kind) == decision


def test_manual_acts_on_nothing_and_recommends_what_full_would_do() -> None:
    full = cycle("full").run(lopsided())
    manual = cycle("manual").run(lopsided())
    assert manual.actions == ()
    assert full.actions and all(a.reason.level == "full" and a.reason.kind == "load" for a in full.actions)
    created = [e.recommendation for e in manual.events if e.status == "created"]
    assert [(r.vm_id, r.source_host, r.target_host) for r in created] == [
        (a.proposal.move.vm_id, a.proposal.move.source, a.proposal.move.target) for a in full.actions]
    assert created[0].reason.level == "manual" and created[0].reason.figures["gain"] > 0
    assert created[0].inventory_version == inventory_version(lopsided())


def test_partial_acts_on_a_fault_and_only_recommends_for_load() -> None:
    c = cycle("partial")
    load = c.run(lopsided())
    assert load.actions == () and [e.status for e in load.events] == ["created"]
    actions, events = c.triage([fault_move()], load.evaluation.version)
    assert [a.proposal.move.vm_id for a in actions] == ["w1"] and events == []
    assert actions[0].reason.kind == "fault" and actions[0].reason.policy == "host.fault.disk"


def test_a_vm_overrides_its_cluster_level() -> None:
    pinned = cycle("full", {f"v{i}": "manual" for i in range(6)}).run(lopsided())
    assert pinned.actions == () and pinned.events  # v0..v5 are the candidates: recommended only
    freed = cycle("manual", {"v0": "full", "v1": "full", "v2": "full", "v3": "full", "v4": "full",
                             "v5": "full"}).run(lopsided())
    assert len(freed.actions) == 1
    with pytest.raises(ValueError, match="automation level"):
        AutomationPolicy("auto")


def test_the_same_move_on_the_same_inventory_is_recommended_once() -> None:
    c = cycle("manual")
    first = c.run(lopsided())
    again = c.run(lopsided())
    assert [e.status for e in first.events] == ["created"] and again.events == ()
    assert len(c.book.current()) == 1


def test_a_recommendation_is_superseded_when_the_inventory_changes() -> None:
    c = cycle("manual")
    rec = c.run(lopsided()).events[0].recommendation
    changed = lopsided().with_move(Move("v5", "h1", "h4"))
    later = c.run(changed)
    superseded = [e for e in later.events if e.status == "superseded"]
    assert [e.recommendation.id for e in superseded] == [rec.id]
    assert superseded[0].superseded_by == inventory_version(changed)
    with pytest.raises(RecommendationError):
        c.book.apply(rec.id, inventory_version(changed))
    fresh = [e.recommendation for e in later.events if e.status == "created"]
    taken, event = c.book.apply(fresh[0].id, inventory_version(changed))
    assert event.status == "applied" and taken == fresh[0] and c.book.current() == []


def test_a_stale_recommendation_is_not_applied() -> None:
    c = cycle("manual")
    rec = c.run(lopsided()).events[0].recommendation
    other = inventory_version(fleet({"h1": [vm("z", 1.0)]}))
    with pytest.raises(RecommendationError, match="superseded"):
        c.book.apply(rec.id, other)
    assert c.book.current() == [rec]  # refused, not lost: observe() reports it superseded


def test_recommendations_are_dismissed_once_balanced() -> None:
    c = cycle("manual")
    c.run(lopsided())
    # the same inventory, the load gone from h1: nothing superseded, nothing left to recommend
    cooled = fleet({"h1": [vm(f"v{i}", 0.2) for i in range(6)], "h2": [vm("w1", 1.0)],
                    "h3": [vm("w2", 1.0)], "h4": [vm("w3", 1.0)]})
    assert inventory_version(cooled) == inventory_version(lopsided())
    calm = c.run(cooled)
    assert [e.status for e in calm.events] == ["dismissed"]
    assert c.book.current() == []


def test_balance_dismisses_only_the_balancers_own_recommendations() -> None:
    c = cycle("manual")
    c.run(lopsided())
    # a host's plane recommended a move of its own on the same inventory (sustained overload)
    own = c.book.current()[0]
    plane = own.model_copy(update={"id": "rec-plane", "reason": own.reason.model_copy(
        update={"policy": "sustained-overload"})})
    c.book.offer([plane])
    cooled = fleet({"h1": [vm(f"v{i}", 0.2) for i in range(6)], "h2": [vm("w1", 1.0)],
                    "h3": [vm("w2", 1.0)], "h4": [vm("w3", 1.0)]})
    calm = c.run(cooled)
    assert {e.recommendation.id for e in calm.events if e.status == "dismissed"} == {own.id}
    assert c.book.current() == [plane]


def test_wire_models_round_trip_and_are_registered() -> None:
    ev = cycle("manual").run(lopsided()).events[0]
    assert decode(encode(ev), RecommendationEvent) == ev
    assert model_for("RecommendationEvent") is RecommendationEvent
    fault = HostFaultEvent(id="f1", host="h2", kind="disk", severity="critical", at=1.0, message="smart: reallocated")
    assert decode(encode(fault), model_for("HostFaultEvent")) == fault
    with pytest.raises(ValueError):
        HostFaultEvent(id="f2", host="h2", kind="gpu", severity="critical")
