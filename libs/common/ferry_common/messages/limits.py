"""Limits every model applies, so hostile input is refused before it costs memory."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AfterValidator, Field, StringConstraints

MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_ELEMENTS = 20_000
MAX_EMBOTS = 20_000
MAX_EVENTS = 200_000
MAX_POLICIES = 64
MAX_ACTIONS = 16
MAX_DEPENDS = 64
MAX_MODULES = 256
MAX_MODULE_ROUNDS = 16  # fetches of missing modules in one transfer (dependencies nested this deep)
MAX_RECENT_IDS = 4096  # a VM's dedup window as it travels (the ids of the events acted on last)
MAX_JSON_DEPTH = 8
MAX_JSON_ITEMS = 256
MAX_STRING = 4096
MAX_EXPRESSION = 1024

Name = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@/-]*$")
]
Trigger = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^(\*|[A-Za-z0-9][A-Za-z0-9._:@/-]*)$")
]
Text = Annotated[str, StringConstraints(max_length=MAX_STRING)]
Expression = Annotated[str, StringConstraints(min_length=1, max_length=MAX_EXPRESSION)]
Digest = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


_PLAIN = frozenset({bool, type(None)})
# CEL's integers are 64-bit: a policy could not read a larger one, nor a state hold it
INT_MIN, INT_MAX = -(2**63), 2**63 - 1


def _check_json(value: Any, depth: int = 0) -> None:
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH}")
    if isinstance(value, dict):
        if len(value) > MAX_JSON_ITEMS:
            raise ValueError(f"more than {MAX_JSON_ITEMS} keys")
        for k, v in value.items():
            if not isinstance(k, str) or len(k) > 128:
                raise ValueError("keys must be strings of at most 128 characters")
            _check_child(v, depth)
    elif isinstance(value, list):
        if len(value) > MAX_JSON_ITEMS:
            raise ValueError(f"more than {MAX_JSON_ITEMS} items")
        for v in value:
            _check_child(v, depth)
    elif isinstance(value, str):
        if len(value) > MAX_STRING:
            raise ValueError(f"string longer than {MAX_STRING}")
    elif isinstance(value, int) and not isinstance(value, bool):
        if not INT_MIN <= value <= INT_MAX:
            raise ValueError("integer outside the 64-bit range")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("not a finite number")
    elif value is None or isinstance(value, bool):
        return
    else:
        raise ValueError(f"not a JSON value: {type(value).__name__}")


def _check_child(v: Any, depth: int) -> None:
    # most values are flat: a scalar child is checked here, without a call per value
    if depth >= MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH}")
    t = type(v)
    if t is str:
        if len(v) > MAX_STRING:
            raise ValueError(f"string longer than {MAX_STRING}")
    elif t is int:
        if not INT_MIN <= v <= INT_MAX:
            raise ValueError("integer outside the 64-bit range")
    elif t is float:
        if not math.isfinite(v):
            raise ValueError("not a finite number")
    elif t not in _PLAIN:
        _check_json(v, depth + 1)


def _bounded(value: dict[str, Any]) -> dict[str, Any]:
    if value:  # most attribute and data dicts are empty or flat: no call for an empty one
        _check_json(value)
    return value


JsonObject = Annotated[dict[str, Any], AfterValidator(_bounded)]


def bounded_list(n: int) -> Any:
    """Field that refuses lists longer than ``n``."""
    return Field(default_factory=list, max_length=n)
