"""Policies are data: CEL conditions and actions evaluated by cel-python, never ``eval``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import celpy
from celpy import celtypes
from ferry_common.messages.domain import Action, Policy
from ferry_common.messages.limits import MAX_JSON_DEPTH, MAX_JSON_ITEMS, MAX_STRING


class PolicyError(Exception):
    """A policy that does not compile, or an expression that fails on this input."""


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

    def compile(self, expression: str) -> Any:
        program = self._programs.get(expression)
        if program is None:
            try:
                program = self._env.program(self._env.compile(expression))
            except Exception as exc:  # celpy raises several parse error types
                raise PolicyError(f"cannot compile {expression!r}: {exc}") from None
            self._programs[expression] = program
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
        if isinstance(result, celpy.CELEvalError):
            raise PolicyError(f"{expression!r} failed: {result}")
        return to_python(result)

    def run(
        self, policy: Policy, event: dict[str, Any], element: dict[str, Any], state: dict[str, Any]
    ) -> list[Effect]:
        """Apply ``policy`` to one event: update ``state`` in place and return the other effects."""
        if event["kind"] not in policy.trigger and "*" not in policy.trigger:
            return []
        activation = {
            "event": celpy.json_to_cel(event),
            "element": celpy.json_to_cel(element),
            "state": celpy.json_to_cel(state),
        }
        if self.evaluate(policy.condition, activation) is not True:
            return []
        effects: list[Effect] = []
        for action in policy.actions:
            effects.extend(self._act(action, activation, state))
        return effects

    def _act(self, action: Action, activation: dict[str, Any], state: dict[str, Any]) -> list[Effect]:
        value = self.evaluate(action.value, activation) if action.value is not None else None
        key = action.key or ("value" if action.kind == "set" else "count")
        previous = state.get(key, _ABSENT)
        if action.kind == "set":
            state[action.key or "value"] = value
        elif action.kind == "increment":
            key = action.key or "count"
            state[key] = state.get(key, 0) + (value if value is not None else 1)
        else:
            return [Effect(action.kind, action.key, value, action.target_host)]
        _keep_bounded(state, key, previous)
        # later actions of the same policy see the updated state
        activation["state"] = celpy.json_to_cel(state)
        return []


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


MAX_STATE_NODES = 16384
_ABSENT: Any = object()


def _keep_bounded(state: dict[str, Any], key: str, previous: Any) -> None:
    """Undo the update of ``state[key]`` and raise ``PolicyError`` if the state no longer fits the
    wire's limits (so it can still migrate) or grew past ``MAX_STATE_NODES`` values.

    A policy that sets ``[state.l, state.l]`` doubles its state on every event: without
    this the host runs out of time and memory within a few dozen events.
    """
    why = _state_problem(state)
    if why is None:
        return
    if previous is _ABSENT:
        state.pop(key, None)
    else:
        state[key] = previous
    raise PolicyError(f"state.{key} not updated: the state would {why}")


def _state_problem(state: dict[str, Any]) -> str | None:
    nodes = 0
    stack: list[tuple[Any, int]] = [(state, 0)]
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_STATE_NODES:
            return f"hold more than {MAX_STATE_NODES} values"
        if depth > MAX_JSON_DEPTH:
            return f"nest deeper than {MAX_JSON_DEPTH}"
        if isinstance(value, dict | list):
            if len(value) > MAX_JSON_ITEMS:
                return f"have a container of more than {MAX_JSON_ITEMS} items"
            if isinstance(value, dict):
                if any(not isinstance(k, str) or len(k) > 128 for k in value):
                    return "have a key that is not a string of at most 128 characters"
                stack.extend((v, depth + 1) for v in value.values())
            else:
                stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, str) and len(value) > MAX_STRING:
            return f"have a string longer than {MAX_STRING}"
    return None
