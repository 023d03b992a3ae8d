"""``decode`` parses and validates in one pass (pydantic-core) and falls back to orjson and
``model_validate`` to say why a body is refused: it must accept exactly what the two-step
path accepts, with the same result, for every wire model."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ferry_common.errors import InvalidMessage
from ferry_common.messages import REGISTRY, decode
from ferry_common.messages.base import Wire
from ferry_common.messages.domain import Event
from tests.fuzz.strategies import garbage, model_payload, mutated

MODELS = sorted(REGISTRY.values(), key=lambda m: m.__name__)


def two_step(body: bytes, model: type[Wire]) -> Wire | None:
    """What decoding was before the one-pass parse: None where it refused."""
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(raw, dict):
        return None
    try:
        return model.model_validate(raw)
    except ValidationError:
        return None


def one_pass(body: bytes, model: type[Wire]) -> Wire | None:
    try:
        return decode(body, model)
    except InvalidMessage:
        return None


@st.composite
def bodies(draw: st.DrawFn) -> tuple[type[Wire], bytes]:
    model = draw(st.sampled_from(MODELS))
    body = draw(st.one_of(
        model_payload(model).map(lambda p: orjson.dumps(p, option=orjson.OPT_NON_STR_KEYS)),
        mutated(model),
        garbage(),
    ))
    return model, body


@settings(max_examples=1000, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(bodies())
def test_one_pass_decoding_accepts_what_two_steps_accept(case: tuple[type[Wire], bytes]) -> None:
    model, body = case
    assert one_pass(body, model) == two_step(body, model)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_non_finite_numbers_are_refused_as_before(literal: bytes) -> None:
    body = b'{"id":"e","vm_id":"v","element_id":"v","kind":"k","ts":' + literal + b"}"
    with pytest.raises(InvalidMessage, match="not JSON"):
        decode(body, Event)
    inside = b'{"id":"e","vm_id":"v","element_id":"v","kind":"k","ts":1,"data":{"x":' + literal + b"}}"
    with pytest.raises(InvalidMessage, match="not JSON"):
        decode(inside, Event)
    with pytest.raises(ValidationError):
        Event(id="e", vm_id="v", element_id="v", kind="k", ts=float("nan"))


@pytest.mark.parametrize("number", [b"20000000000000000000", b"-9999999999999999999", b"9223372036854775807"])
def test_integers_beyond_64_bits_are_refused_as_before(number: bytes) -> None:
    from ferry_common.messages.commands import MigrationCompleteAck
    body = b'{"dispatched":' + number + b"}"
    assert one_pass(body, MigrationCompleteAck) == two_step(body, MigrationCompleteAck)
