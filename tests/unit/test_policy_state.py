"""Policy state stays within what CEL and the wire can carry, checked where it changes."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from ferry_common.messages.domain import Action, Embot, Policy
from ferry_managed_object.policy import MAX_STATE_NODES, PolicyEngine, PolicyError

EVENT: dict[str, Any] = {"id": "e1", "kind": "k", "ts": 1.0, "element_id": "vm", "data": {"big": 2**62}}
ELEMENT: dict[str, Any] = {"id": "vm", "type": "vm", "attributes": {}}


def run(policy: Policy, state: dict[str, Any]) -> None:
    PolicyEngine().run(policy, EVENT, ELEMENT, state)


def test_an_increment_past_the_64_bit_range_is_refused_and_the_state_kept() -> None:
    policy = Policy(name="p", trigger=["*"], actions=[Action(kind="increment", key="n", value="event.data.big")])
    state: dict[str, Any] = {"n": 2**62}
    with pytest.raises(PolicyError, match="state.n not updated"):
        run(policy, state)
    assert state == {"n": 2**62}


def test_a_counter_updates_in_place_and_a_new_container_is_measured() -> None:
    count = Policy(name="c", trigger=["*"], actions=[Action(kind="increment", key="n")])
    state: dict[str, Any] = {}
    for _ in range(3):
        run(count, state)
    assert state == {"n": 3}
    # a scalar replaced by a container is measured against the whole state
    wide = Policy(name="w", trigger=["*"], actions=[Action(kind="set", key="n", value="[" + ",".join(["1"] * 300) + "]")])
    with pytest.raises(PolicyError, match="more than 256 items"):
        run(wide, state)
    assert state == {"n": 3}
    assert MAX_STATE_NODES > 256


def test_a_long_string_replacing_a_scalar_is_refused() -> None:
    long = Policy(name="l", trigger=["*"], actions=[Action(kind="set", key="s", value="event.kind")])
    state: dict[str, Any] = {"s": 1}
    with pytest.raises(PolicyError, match="string longer"):
        PolicyEngine().run(long, {**EVENT, "kind": "k" * 5000}, ELEMENT, state)
    assert state == {"s": 1}


def test_the_wire_refuses_integers_cel_cannot_hold() -> None:
    with pytest.raises(ValidationError, match="64-bit"):
        Embot(id="b", module="m", elements=["vm"], state={"n": 2**63})
    with pytest.raises(ValidationError, match="64-bit"):
        Embot(id="b", module="m", elements=["vm"], state={"deep": {"n": -(2**63) - 1}})
    assert Embot(id="b", module="m", elements=["vm"], state={"n": 2**63 - 1}).state == {"n": 2**63 - 1}
