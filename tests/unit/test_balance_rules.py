"""The balancer's rules against storms: each test fails without the rule it names."""

from __future__ import annotations

import json

import pytest

from ferry_common.clock import FakeClock
from ferry_coordinator.balance import (
    Balancer,
    BalancerState,
    BalanceRules,
    CapacityPlacement,
    FleetError,
    HostLoad,
    Move,
    WorkInFlight,
    imbalance,
)
from ferry_coordinator.balance.metric import host_utilisation
from tests.unit.balance_fixtures import fleet, lopsided, vm


def balancer(clock: FakeClock | None = None, **rules: float) -> Balancer:
    return Balancer(CapacityPlacement(), BalanceRules(**rules), clock or FakeClock())


def test_the_metric_is_the_coefficient_of_variation_of_dominant_shares() -> None:
    assert imbalance([0.5, 0.5, 0.5]) == 0.0
    assert imbalance([0.2, 0.6]) == pytest.approx(0.2 / 0.4)
    assert imbalance([0.01, 0.03]) == 0.0  # an idle fleet is not out of balance
    h = HostLoad("h", 10, 1000, (vm("a", 2.0, 100),))
    assert host_utilisation(h) == pytest.approx(0.256)  # memory (256/1000) dominates cpu (2/10)


def test_no_move_before_the_threshold_held_for_hold_rounds() -> None:
    b = balancer(hold_rounds=3)
    f = lopsided()
    assert imbalance([host_utilisation(h) for h in f.hosts]) > 0.3
    first, second = b.evaluate(f), b.evaluate(f)
    assert (first.proposals, first.idle, first.rounds_above) == ((), "holding", 1)
    assert (second.proposals, second.idle) == ((), "holding")
    third = b.evaluate(f)
    assert len(third.proposals) == 1 and third.rounds_above == 3


def test_a_round_under_the_threshold_restarts_the_count() -> None:
    b = balancer(hold_rounds=3)
    calm = fleet({"h1": [vm("a", 2.0)], "h2": [vm("b", 2.0)]})
    b.evaluate(lopsided())
    b.evaluate(lopsided())
    assert b.evaluate(calm).idle == "balanced"
    assert b.evaluate(lopsided()).proposals == ()
    assert b.evaluate(lopsided()).proposals == ()
    assert b.evaluate(lopsided()).proposals != ()


def test_nothing_moves_under_the_threshold_however_long() -> None:
    b = balancer(hold_rounds=1, threshold=0.3, target=0.1)
    # utilisations 0.5 and 0.75: imbalance 0.2, a move would lower it but it is under 0.3
    f = fleet({"h1": [vm(f"a{i}", 1.0) for i in range(8)], "h2": [vm(f"b{i}", 1.0) for i in range(12)]})
    assert imbalance([host_utilisation(h) for h in f.hosts]) == pytest.approx(0.2)
    assert balancer(hold_rounds=1, threshold=0.15, target=0.1).evaluate(f).proposals != ()
    for _ in range(10):
        assert b.evaluate(f).proposals == ()


def test_once_started_it_balances_down_to_the_target_not_just_under_the_threshold() -> None:
    # imbalance 0.25: between the target (0.2) and the threshold (0.3)
    band = fleet({"h1": [vm(f"a{i}", 1.0) for i in range(6)], "h2": [vm(f"b{i}", 1.0) for i in range(10)]})
    assert imbalance([host_utilisation(h) for h in band.hosts]) == pytest.approx(0.25)
    idle = balancer(hold_rounds=1)
    assert idle.evaluate(band).proposals == ()  # not started: the band is left alone
    started = balancer(hold_rounds=1)
    assert started.evaluate(lopsided()).proposals != ()
    assert [p.move.source for p in started.evaluate(band).proposals] == ["h2"]  # goes on to 0.2


def test_a_move_must_gain_at_least_min_gain() -> None:
    # two hosts, one VM each at 10 and 4 cores: moving either only swaps or worsens the spread,
    # and the small one moving gains little
    f = fleet({"h1": [vm("big", 10.0), vm("small", 0.4)], "h2": [vm("other", 4.0)]})
    before = imbalance([host_utilisation(h) for h in f.hosts])
    gain = before - imbalance([host_utilisation(h) for h in f.with_move(Move("small", "h1", "h2")).hosts])
    assert 0 < gain < 0.2
    strict = balancer(hold_rounds=1, min_gain=0.2).evaluate(f)
    assert (strict.proposals, strict.idle) == ((), "no_gain")
    loose = balancer(hold_rounds=1, min_gain=0.0).evaluate(f)
    assert [p.move.vm_id for p in loose.proposals] == ["small"]
    assert loose.proposals[0].gain == pytest.approx(gain)


async def test_a_vm_is_not_moved_again_within_its_cooldown() -> None:
    clock = FakeClock()
    b = balancer(clock, hold_rounds=1, cooldown_s=600.0, target=0.0, min_gain=0.0)
    # x was just moved to h2; now h2 is the hot one and moving x back is the best move
    b.started("x")
    hot_again = fleet({"h1": [vm("a", 1.0)], "h2": [vm("x", 3.5), vm("y", 8.0)]})

    def moved() -> list[str]:
        return [p.move.vm_id for p in b.evaluate(hot_again).proposals]

    assert moved() == ["y"]
    await clock.advance(599.0)
    assert moved() == ["y"]
    await clock.advance(2.0)
    assert moved() == ["x"]


def test_never_more_automatic_migrations_in_flight_than_allowed() -> None:
    f = lopsided()
    full = balancer(hold_rounds=1, max_in_flight=1).evaluate(f, WorkInFlight(automatic=frozenset({"v0"})))
    assert (full.proposals, full.idle) == ((), "in_flight_limit")
    two = balancer(hold_rounds=1, max_in_flight=3).evaluate(f, WorkInFlight(automatic=frozenset({"v0"})))
    moved = [p.move.vm_id for p in two.proposals]
    assert len(moved) == 2 and len(set(moved)) == 2 and "v0" not in moved
    assert len(balancer(hold_rounds=1).evaluate(f).proposals) == 1  # the default is one


@pytest.mark.parametrize("work", [WorkInFlight(other=frozenset({"w1"})), WorkInFlight(busy=True)])
def test_automatic_work_yields_to_drains_and_operators(work: WorkInFlight) -> None:
    b = balancer(hold_rounds=1)
    ev = b.evaluate(lopsided(), work)
    assert (ev.proposals, ev.idle) == ((), "yielding")
    assert b.evaluate(lopsided()).proposals != ()  # the same round without them moves


def test_moves_respect_capacity_and_reservations() -> None:
    # the only cool host has its memory reserved by an inbound migration
    f = fleet({"h1": [vm("a", 8.0), vm("b", 6.0)], "h2": [vm("c", 1.0)]}, reserved={"h2": 64 * 1024 - 2048})
    ev = balancer(hold_rounds=1, min_gain=0.0).evaluate(f)
    assert ev.proposals == ()


async def test_a_replica_taking_over_keeps_the_hold_count_and_the_cooldowns() -> None:
    clock = FakeClock()
    first = balancer(clock, hold_rounds=3)
    first.evaluate(lopsided())
    first.evaluate(lopsided())
    first.started("v0")
    saved = json.loads(json.dumps(first.state.to_dict()))  # as the store keeps it
    await clock.advance(60.0)
    second = Balancer(CapacityPlacement(), first.rules, clock, BalancerState.from_dict(saved))
    moves = second.evaluate(lopsided()).proposals  # the third round above the threshold
    assert len(moves) == 1 and moves[0].move.vm_id != "v0"
    with pytest.raises(ValueError, match="malformed"):
        BalancerState.from_dict({"moved_at": {"v0": "soon"}})


def test_bad_input_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="threshold"):
        BalanceRules(threshold=float("nan"))
    with pytest.raises(ValueError, match="target"):
        BalanceRules(threshold=0.2, target=0.3)
    with pytest.raises(FleetError, match="both"):
        fleet({"h1": [vm("a", 1.0)], "h2": [vm("a", 1.0)]})
    with pytest.raises(FleetError, match="positive"):
        HostLoad("h", 0, 1024)
