"""Policies are data from the wire: an expression that could run long is refused when the
graph is checked, before any event reaches it (cel-python has no evaluation budget)."""

from __future__ import annotations

import celpy
import pytest

from ferry_managed_object.policy import MAX_COST, PolicyEngine, PolicyError, cost

ONE = "event.data.xs.all(x, x > 0)"
NESTED = "event.data.xs.all(x, event.data.xs.exists(y, y == x))"


def parsed(expression: str) -> object:
    return celpy.Environment().compile(expression)


def test_a_comprehension_costs_its_body_once_per_item() -> None:
    body = cost(parsed("x > 0"))
    assert cost(parsed(ONE)) > 256 * body
    assert cost(parsed(NESTED)) > 256 * cost(parsed(ONE))


@pytest.mark.parametrize("expression", ["true", "event.data.value > 0.8", "has(state.n) && state.n >= 3", ONE])
def test_ordinary_expressions_are_accepted(expression: str) -> None:
    assert cost(parsed(expression)) <= MAX_COST
    PolicyEngine().compile(expression)


@pytest.mark.parametrize("expression", [NESTED, " && ".join([ONE] * 3), "event.data.xs.map(x, event.data.xs.map(y, x * y))"])
def test_expressions_that_could_run_long_are_refused(expression: str) -> None:
    with pytest.raises(PolicyError, match="evaluation steps"):
        PolicyEngine().compile(expression)
