"""The native fast path must agree with cel-python wherever it answers at all."""

from __future__ import annotations

from typing import Any

import celpy
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry_managed_object.policy import FALLBACK, PolicyEngine, native

PATHS = ["event.data.value", "event.kind", "state.count", "state.n.m", "element.attributes.size", "event.ts"]
values = st.one_of(
    st.integers(-(2**40), 2**40), st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.booleans(), st.text(max_size=5), st.none(),
)
scopes = st.fixed_dictionaries({
    "event": st.fixed_dictionaries({"kind": st.sampled_from(["cpu.load", "x"]), "ts": st.floats(0, 1e9),
                                    "data": st.dictionaries(st.sampled_from(["value", "code"]), values, max_size=2)}),
    "element": st.fixed_dictionaries({"attributes": st.dictionaries(st.sampled_from(["size"]), values, max_size=1)}),
    "state": st.dictionaries(st.sampled_from(["count", "n"]),
                             st.one_of(values, st.dictionaries(st.just("m"), values, max_size=1)), max_size=2),
})
numbers = st.one_of(st.integers(0, 1000).map(str), st.floats(0, 1000).map(lambda f: f"{f:.3f}"))
terms = st.one_of(
    st.just("true"), st.just("false"),
    st.sampled_from(PATHS),
    st.sampled_from(PATHS).map(lambda p: f"has({p})"),
    st.tuples(st.sampled_from(PATHS), st.sampled_from([">", ">=", "<", "<=", "==", "!="]), numbers).map(" ".join),
    st.sampled_from(PATHS).map(lambda p: f"{{'v': {p}}}"),
)
expressions = st.lists(terms, min_size=1, max_size=3).map(" && ".join)


def celpy_eval(expression: str, scope: dict[str, Any]) -> Any:
    engine = PolicyEngine()
    activation = {k: celpy.json_to_cel(v) for k, v in scope.items()}
    try:
        return ("ok", engine.evaluate(expression, activation))
    except Exception as exc:
        return ("error", type(exc).__name__)


@settings(max_examples=400, deadline=None)
@given(expressions, scopes)
def test_native_agrees_with_cel_python(expression: str, scope: dict[str, Any]) -> None:
    fast = native(expression)
    if fast is None:
        return  # outside the subset: cel-python answers alone
    got = fast(scope)
    if got is FALLBACK:
        return  # the fast path declined: cel-python answers, errors included
    assert celpy_eval(expression, scope) == ("ok", got), expression


def test_the_subset_covers_the_sample_policies() -> None:
    for expression in ("event.data.value > 0.8", "has(state.high_samples) && state.high_samples >= 3",
                       "true", "{'samples': state.high_samples}"):
        assert native(expression) is not None, expression
