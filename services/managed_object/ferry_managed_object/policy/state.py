"""An embot's state after a policy's action: kept within the wire's limits, or left as it was."""

from __future__ import annotations

from typing import Any

from ferry_common.messages.limits import MAX_JSON_DEPTH, MAX_JSON_ITEMS, MAX_STRING

from .errors import PolicyError

MAX_STATE_NODES = 16384
ABSENT: Any = object()


def keep_bounded(state: dict[str, Any], key: str, previous: Any) -> None:
    """Undo the update of ``state[key]`` and raise ``PolicyError`` if the state no longer fits the
    wire's limits (so it can still migrate) or grew past ``MAX_STATE_NODES`` values.

    A policy that sets ``[state.l, state.l]`` doubles its state on every event: without
    this the host runs out of time and memory within a few dozen events.
    """
    value = state[key]
    if previous is not ABSENT and _is_scalar(previous) and _is_scalar(value):
        # a scalar replaced by a scalar (a counter, a last-seen value): no container, count or
        # depth changed, so only the value itself needs a look, not the whole state
        if not (isinstance(value, str) and len(value) > MAX_STRING):
            return
    why = _state_problem(state)
    if why is None:
        return
    restore(state, key, previous)
    raise PolicyError(f"state.{key} not updated: the state would {why}")


def restore(state: dict[str, Any], key: str, previous: Any) -> None:
    if previous is ABSENT:
        state.pop(key, None)
    else:
        state[key] = previous


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, dict | list)


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
