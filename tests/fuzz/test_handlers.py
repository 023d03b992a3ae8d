"""Hostile input to every handler of every service, through the in-memory bus.

Each example publishes one message to one service's queue (``host.<host>.<service>``,
the coordinator's ``migration.requested``/``migration.cancel``/``coordinator.query``,
or a routing-key-typed key such as ``vm.vm1.event``) and waits until the consumer
runtime settled it. The acknowledgement policy must hold for anything:

* a message that does not validate is dead-lettered with a non-empty reason, never
  handled; one that validates is handled or refused with a reason (both are counted);
* nothing is a bug: no dead letter says ``internal error``;
* a request with ``reply_to`` that is dead-lettered gets an ``ErrorReply`` with the same
  reason and code;
* nothing hangs (10 s per message), and the service still answers a valid ``Inspect``.

``FERRY_SOAK=1`` multiplies the example counts by ten.
"""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferry_common.bus.interfaces import Message
from ferry_common.messages import REGISTRY, decode
from ferry_common.messages.limits import MAX_BODY_BYTES

from .rig import HOST_SERVICES, Outcome, Rig, Target, check_outcome, rig_fixture
from .strategies import SOAK, garbage, model_payload, mutated

TARGETS = [f"{h}/{s}" for h in ("host-a", "host-b") for s in HOST_SERVICES] + ["coordinator"]
COORDINATOR_KEYS = ("migration.requested", "migration.cancel", "coordinator.query")
FUZZ = settings(
    max_examples=1000 if SOAK else 100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    yield from rig_fixture()


def valid_for(target: Target, msg: Message) -> bool:
    """Whether the consumer runtime can route and decode ``msg`` (so a handler sees it)."""
    try:
        model, _ = target.router.resolve(msg)
        decode(msg.body, model)
    except Exception:
        return False
    return True


def settle(rig: Rig, target: Target, body: bytes, type_: str, reply: bool, key: str | None = None) -> Outcome:
    async def go() -> Outcome:
        out = await rig.deliver(target, body, type_=type_, reply=reply, routing_key=key)
        await rig.alive(target)
        return out

    out = rig.run(go())
    check_outcome(out, rig, expect_invalid=not valid_for(target, out.message))
    rig.purge_replies()
    return out


def _key(data: st.DataObject, target: Target) -> str | None:
    if target.name == "coordinator":
        return data.draw(st.sampled_from(COORDINATOR_KEYS), label="routing key")
    return None


def _handled_type(rig: Rig, data: st.DataObject, name: str) -> tuple[Target, str]:
    """The target named ``name`` and one of the types its router handles."""
    target = rig.targets[name]
    return target, data.draw(st.sampled_from(sorted(target.router.handlers)), label="type")


# one message to one target, asking for a reply or not
TO_A_TARGET = given(data=st.data(), name=st.sampled_from(TARGETS), reply=st.booleans())


@FUZZ
@given(data=st.data(), name=st.sampled_from(TARGETS), body=garbage(), reply=st.booleans())
def test_garbage(rig: Rig, data: st.DataObject, name: str, body: bytes, reply: bool) -> None:
    """Random bytes, non-JSON, JSON of the wrong shape, with a handled type or none."""
    target = rig.targets[name]
    type_ = data.draw(st.sampled_from(["", *target.router.handlers]), label="type")
    settle(rig, target, body, type_, reply, _key(data, target))


@FUZZ
@TO_A_TARGET
def test_one_field_mutated(rig: Rig, data: st.DataObject, name: str, reply: bool) -> None:
    """A message of a type the service handles, with one value made hostile, dropped or added."""
    target, type_ = _handled_type(rig, data, name)
    model = target.router.handlers[type_][0]
    body = data.draw(mutated(model), label="body")
    settle(rig, target, body, type_, reply, _key(data, target))


@FUZZ
@TO_A_TARGET
def test_generated_messages(rig: Rig, data: st.DataObject, name: str, reply: bool) -> None:
    """Mostly valid messages of every handled type, with ids real and made up: handled or refused."""
    target, type_ = _handled_type(rig, data, name)
    body = orjson.dumps(data.draw(model_payload(target.router.handlers[type_][0]), label="payload"))
    out = settle(rig, target, body, type_, reply, _key(data, target))
    if out.handled or out.code not in ("invalid_message", "unknown_type"):
        rig.count("valid type, got past decoding")


@FUZZ
@TO_A_TARGET
def test_wrong_or_unknown_type(rig: Rig, data: st.DataObject, name: str, reply: bool) -> None:
    """A valid message of a type this service does not take, or a type nobody knows."""
    target = rig.targets[name]
    foreign = sorted(set(REGISTRY) - set(target.router.handlers))
    type_ = data.draw(st.sampled_from(foreign) | st.text(min_size=1, max_size=30), label="type")
    model = REGISTRY.get(type_)
    body = orjson.dumps(data.draw(model_payload(model), label="payload")) if model else b"{}"
    out = settle(rig, target, body, type_, reply, _key(data, target))
    assert not out.handled and out.code == "unknown_type", (out.code, out.reason)


@FUZZ
@given(data=st.data(), reply=st.booleans())
def test_routing_key_typed_messages(rig: Rig, data: st.DataObject, reply: bool) -> None:
    """Untyped messages typed by their key: service-plane events, inventories, notifications."""
    key, name, model = data.draw(
        st.sampled_from(
            [
                ("vm.vm1.event", "host-a/sensor", "VmEvent"),
                ("vm.vm1.event", "host-a/sensor", ""),
                ("inventory.host-b", "host-b/migration_policy", "HostInventory"),
            ]
        ),
        label="key",
    )
    target = rig.targets[name]
    # an earlier valid SourceTeardown may have unbound vm1's events from host-a: bind them again
    rig.run(rig.bus.bind("ferry." + name.replace("/", "."), key))
    wire = REGISTRY["VmEvent" if key.startswith("vm.") else "HostInventory"]
    body = data.draw(mutated(wire) | model_payload(wire).map(orjson.dumps) | garbage(), label="body")
    settle(rig, target, body, model, reply, key)


@pytest.mark.parametrize("name", ["host-a/managed_object", "coordinator"])
def test_oversized_body(rig: Rig, name: str) -> None:
    """A body over the limit is refused before it is parsed, and the requester is told."""
    target = rig.targets[name]
    body = b'{"vm_id": "' + b"v" * (MAX_BODY_BYTES + 1) + b'"}'
    out = settle(rig, target, body, "Inspect" if name != "coordinator" else "", True)
    assert not out.handled and "exceeds" in out.reason


def test_report_tally(rig: Rig) -> None:
    """Not a check: prints what the examples above came to (``pytest -s``)."""
    print("fuzz tally:", dict(sorted(rig.tally.items())))
