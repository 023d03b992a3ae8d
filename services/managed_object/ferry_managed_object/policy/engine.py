"""Policies are data: CEL conditions and actions evaluated by cel-python, never ``eval``.

cel-python walks a parse tree in Python and converts every input to CEL values
first, which costs about a millisecond per policy. The expressions policies use most
(``true``, a field such as ``event.data.value``, ``has(state.x)``, a comparison with a
number, ``&&`` of those) are therefore also compiled to a small native evaluator that
answers the common case exactly as CEL would and hands everything else (a missing
key, a type it does not handle, an error) back to cel-python. Every expression is
still compiled by cel-python first, so what is accepted and refused is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import celpy
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError

from ferry_common.messages.domain import Action, Policy

from .cost import MAX_COST, cost
from .errors import PolicyError
from .fastpath import FALLBACK, Native, native
from .state import ABSENT, keep_bounded, restore


@dataclass(frozen=True)
class Effect:
    """Something an action asks the service to do besides changing the embot's state."""

    kind: str  # alarm | clear_alarm | emit | migrate
    key: str | None
    value: Any
    target_host: str | None = None


class PolicyEngine:
    """Compiles each expression once and evaluates it over ``event``, ``element`` and ``state``."""

    def __init__(self) -> None:
        self._env = celpy.Environment()
        self._programs: dict[str, Any] = {}
        self._natives: dict[str, Native | None] = {}
        self._checked: tuple[Any, Any] | None = None  # the last (event, element) found convertible

    def compile(self, expression: str) -> Any:
        program = self._programs.get(expression)
        if program is None:
            try:
                ast = self._env.compile(expression)
            except Exception as exc:  # celpy raises several parse error types
                raise PolicyError(f"cannot compile {expression!r}: {exc}") from None
            worst = cost(ast)
            if worst > MAX_COST:
                # cel-python has no evaluation budget: refuse what could run long, up front
                raise PolicyError(f"{expression!r} could take {worst:,} evaluation steps (at most {MAX_COST:,})")
            try:
                program = self._env.program(ast)
            except Exception as exc:
                raise PolicyError(f"cannot compile {expression!r}: {exc}") from None
            self._programs[expression] = program
            self._natives[expression] = native(expression)
        return program

    def check(self, policy: Policy) -> None:
        """Raise :class:`PolicyError` unless every expression of ``policy`` compiles."""
        self.compile(policy.condition)
        for action in policy.actions:
            if action.value is not None:
                self.compile(action.value)

    def evaluate(self, expression: str, activation: dict[str, Any]) -> Any:
        try:
            result = self.compile(expression).evaluate(activation)
        except PolicyError:
            raise
        except Exception as exc:
            raise PolicyError(f"{expression!r} failed: {exc}") from None
        if isinstance(result, CELEvalError):
            raise PolicyError(f"{expression!r} failed: {result}")
        return to_python(result)

    def _eval(self, expression: str, scope: _Scope) -> Any:
        self.compile(expression)
        fast = self._natives.get(expression)
        if fast is not None:
            result = fast(scope.plain)
            if result is not FALLBACK:
                return result
        return self.evaluate(expression, scope.cel())

    def run(
        self, policy: Policy, event: dict[str, Any], element: dict[str, Any], state: dict[str, Any]
    ) -> list[Effect]:
        """Apply ``policy`` to one event: update ``state`` in place and return the other effects."""
        if event["kind"] not in policy.trigger and "*" not in policy.trigger:
            return []
        # the inputs must convert to CEL values whether or not cel-python is asked (it raises
        # ValueError on what it cannot represent); an event is checked once for all its policies
        checked = self._checked
        if checked is None or checked[0] is not event or checked[1] is not element:
            check_cel(event)
            check_cel(element)
            self._checked = (event, element)
        # ``state`` is not walked here: what enters it is checked where it enters (the wire's
        # limits keep integers in CEL's range; every update below checks what it stores)
        scope = _Scope(event, element, state)
        if self._eval(policy.condition, scope) is not True:
            return []
        effects: list[Effect] = []
        for action in policy.actions:
            effects.extend(self._act(action, scope, state))
        return effects

    def _act(self, action: Action, scope: _Scope, state: dict[str, Any]) -> list[Effect]:
        value = self._eval(action.value, scope) if action.value is not None else None
        key = action.key or ("value" if action.kind == "set" else "count")
        previous = state.get(key, ABSENT)
        if action.kind == "set":
            state[action.key or "value"] = value
        elif action.kind == "increment":
            key = action.key or "count"
            state[key] = state.get(key, 0) + (value if value is not None else 1)
        else:
            return [Effect(action.kind, action.key, value, action.target_host)]
        try:
            check_cel(state[key])  # an increment can leave CEL's integer range
        except ValueError as exc:
            restore(state, key, previous)
            raise PolicyError(f"state.{key} not updated: {exc}") from None
        keep_bounded(state, key, previous)
        # later actions of the same policy see the updated state
        scope.state_changed()
        return []


class _Scope:
    """An evaluation's inputs as plain values, and as CEL values once cel-python needs them."""

    __slots__ = ("plain", "_cel")

    def __init__(self, event: dict[str, Any], element: dict[str, Any], state: dict[str, Any]) -> None:
        self.plain = {"event": event, "element": element, "state": state}
        self._cel: dict[str, Any] | None = None

    def cel(self) -> dict[str, Any]:
        if self._cel is None:
            self._cel = {k: json_to_cel(v) for k, v in self.plain.items()}
        return self._cel

    def state_changed(self) -> None:
        if self._cel is not None:
            self._cel["state"] = json_to_cel(self.plain["state"])


def check_cel(value: Any) -> None:
    """Raise what ``json_to_cel`` raises on ``value``, without building CEL values."""
    if isinstance(value, bool | float | str) or value is None:
        return
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise ValueError("overflow")
    elif isinstance(value, dict):
        for k, v in value.items():
            check_cel(k)
            check_cel(v)
    elif isinstance(value, list | tuple):
        for v in value:
            check_cel(v)
    else:
        json_to_cel(value)



def to_python(value: Any) -> Any:
    """CEL values back to plain JSON-able Python."""
    if isinstance(value, celtypes.BoolType):
        return bool(value)
    if isinstance(value, celtypes.IntType | celtypes.UintType):
        return int(value)
    if isinstance(value, celtypes.DoubleType):
        return float(value)
    if isinstance(value, celtypes.StringType):
        return str(value)
    if isinstance(value, celtypes.MapType | dict):
        return {str(to_python(k)): to_python(v) for k, v in value.items()}
    if isinstance(value, celtypes.ListType | list):
        return [to_python(v) for v in value]
    if value is None or isinstance(value, celtypes.NullType):
        return None
    return value


