"""The drain's state machine, progress and plan (pure parts of fleet/drain*.py)."""

from __future__ import annotations

import pytest

from ferry_common.messages.domain import VmSpec
from ferry_coordinator.fleet.drain import (
    Drain,
    DrainState,
    DrainVm,
    InvalidTransition,
    VmState,
    migration_id,
)
from ferry_coordinator.fleet.drain_planner import plan_drain
from ferry_coordinator.fleet.view import FleetView, HostView


def test_states_only_move_forward_from_draining() -> None:
    d = Drain("d1", "host-a")
    ended = d.to(DrainState.DRAINED, now=5.0)
    assert ended.state is DrainState.DRAINED and ended.ended_at == 5.0
    for state in (DrainState.DRAINING, DrainState.FAILED, DrainState.CANCELLED):
        with pytest.raises(InvalidTransition):
            ended.to(state, now=6.0)


def test_round_trip_counts_eta_and_outcome() -> None:
    d = Drain("d1", "host-a", vms={f"v{i}": DrainVm(f"v{i}") for i in range(5)})
    d.vms["v0"].state, d.vms["v0"].target = VmState.DONE, "host-b"
    d.vms["v1"].state = VmState.IN_FLIGHT
    d.vms["v2"].state = VmState.UNMOVABLE
    assert d.eta_s(2) is None  # nothing measured yet
    d.durations += [1.0, 3.0]
    assert d.eta_s(2) == 2 * 2.0  # v1, v3, v4 left: two waves of the mean
    again = Drain.from_dict(d.to_dict())
    assert again == d and again.counts() == {"total": 5, "done": 1, "failed": 0, "in_flight": 1, "queued": 2,
                                             "unmovable": 1, "cancelled": 0}
    for v in ("v1", "v3", "v4"):
        d.vms[v].state = VmState.DONE
    assert d.outcome() == (DrainState.FAILED, "cannot move: v2")
    d.on_unmovable = "leave"
    assert d.outcome() == (DrainState.DRAINED, "cannot move: v2")
    assert migration_id("d1", "v3", 2) == "drain.d1.v3.2"


def _host(name: str, free: int, **kw: object) -> HostView:
    return HostView(name=name, driver="sim", capacity_mib=free, **kw)  # type: ignore[arg-type]


def test_the_plan_reserves_what_it_places_and_names_who_cannot_move() -> None:
    view = FleetView([_host("host-a", 8192), _host("host-b", 1000), _host("host-c", 700),
                      _host("host-d", 4096, cordoned=True)])
    vms = [VmSpec(vm_id="big", memory_mib=900), VmSpec(vm_id="mid", memory_mib=600),
           VmSpec(vm_id="small", memory_mib=600), VmSpec(vm_id="pin", memory_mib=10, params={"pinned": True})]
    movable, stuck = plan_drain("host-a", vms, view, parallel=1, measured=[2.0])
    # largest first; host-b is full after "big", so "mid" goes to host-c and "small" fits nowhere
    assert [(p.vm_id, p.target, p.order, p.estimate_s) for p in movable] == [("big", "host-b", 0, 2.0),
                                                                             ("mid", "host-c", 1, 4.0)]
    reasons = {p.vm_id: p.reason for p in stuck}
    assert reasons["pin"] == "pinned by policy (pinned: true)"
    assert reasons["small"] is not None and "host-b: insufficient memory" in reasons["small"]
    assert "host-d: cordoned" in reasons["small"]
    assert view.hosts["host-b"].reserved_mib == 0  # the caller's view is untouched
