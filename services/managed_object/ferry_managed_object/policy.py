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

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import celpy
from celpy import celtypes
from lark import Token, Tree

from ferry_common.messages.domain import Action, Policy
from ferry_common.messages.limits import MAX_JSON_DEPTH, MAX_JSON_ITEMS, MAX_STRING

# A static bound on what one evaluation may cost, in syntax-tree nodes visited: each
# comprehension macro (all, exists, exists_one, map, filter) may visit its body once per item
# of a list or map, and no JSON container holds more than MAX_JSON_ITEMS. Nested
# comprehensions multiply; 1 KiB of text could otherwise ask for 256^n steps.
MAX_COST = 10_000  # about 0.1 s of cel-python on this machine
_MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})


def cost(tree: Any) -> int:
    """The most nodes one evaluation of the parsed expression ``tree`` can visit."""
    if not isinstance(tree, Tree):
        return 1
    if tree.data == "member_dot_arg" and len(tree.children) >= 3:
        name = tree.children[1]
        if isinstance(name, Token) and str(name) in _MACROS:
            target, _, args = tree.children[0], name, tree.children[2]
            return 1 + cost(target) + MAX_JSON_ITEMS * cost(args)
    return 1 + sum(cost(c) for c in tree.children)


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
        if isinstance(result, celpy.CELEvalError):
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
        previous = state.get(key, _ABSENT)
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
            _restore(state, key, previous)
            raise PolicyError(f"state.{key} not updated: {exc}") from None
        _keep_bounded(state, key, previous)
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
            self._cel = {k: celpy.json_to_cel(v) for k, v in self.plain.items()}
        return self._cel

    def state_changed(self) -> None:
        if self._cel is not None:
            self._cel["state"] = celpy.json_to_cel(self.plain["state"])


def check_cel(value: Any) -> None:
    """Raise what ``celpy.json_to_cel`` raises on ``value``, without building CEL values."""
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
        celpy.json_to_cel(value)


# ---- the native evaluator -------------------------------------------------------------------
FALLBACK: Any = object()  # "ask cel-python": the native evaluator does not answer this case
Native = Callable[[dict[str, Any]], Any]
_ROOTS = frozenset({"event", "element", "state"})
_RESERVED = frozenset({
    "true", "false", "null", "in", "as", "break", "const", "continue", "else", "for", "function", "if",
    "import", "let", "loop", "package", "namespace", "return", "var", "void", "while", "has",
})
_TOKEN = re.compile(
    r"\s*(?:(?P<has>has\()|(?P<num>(?:0|[1-9][0-9]*)(?:\.[0-9]+)?)(?![0-9A-Za-z_.])"
    r"|(?P<path>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)|(?P<op>&&|>=|<=|==|!=|>|<|\))"
    r"|(?P<str>'[A-Za-z0-9_ .:/@-]*'|\"[A-Za-z0-9_ .:/@-]*\")|(?P<punct>[{}:,]))"
)
_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}


def native(expression: str) -> Native | None:
    """A native evaluator for ``expression``, or None if it is outside the subset handled.

    The subset: ``true``, ``false``, a field path from ``event``/``element``/``state``,
    ``has(path)``, ``path <op> number`` and ``&&`` of those. Evaluators return
    :data:`FALLBACK` for anything but the plain case (a missing key, a value of another
    type, a non-boolean operand), which cel-python then answers, errors included.
    """
    tokens: list[tuple[str, str]] = []
    pos = 0
    text = expression.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            return None
        kind = m.lastgroup or ""
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    terms: list[Native] = []
    i = 0
    while True:
        term, i = _term(tokens, i)
        if term is None:
            return None
        terms.append(term)
        if i == len(tokens):
            break
        if tokens[i] != ("op", "&&"):
            return None
        i += 1
    return terms[0] if len(terms) == 1 else _conjunction(terms)


def _term(tokens: list[tuple[str, str]], i: int) -> tuple[Native | None, int]:
    if i >= len(tokens):
        return None, i
    kind, text = tokens[i]
    if kind == "has":
        if i + 2 >= len(tokens) or tokens[i + 1][0] != "path" or tokens[i + 2] != ("op", ")"):
            return None, i
        parts = _path(tokens[i + 1][1])
        if parts is None or len(parts) < 2:
            return None, i
        return _has(parts), i + 3
    if (kind, text) == ("punct", "{"):
        return _map_literal(tokens, i + 1)
    if kind != "path":
        return None, i
    if text in ("true", "false"):
        value = text == "true"
        return (lambda _: value), i + 1
    parts = _path(text)
    if parts is None:
        return None, i
    get = _getter(parts)
    if i + 1 < len(tokens) and tokens[i + 1][0] == "op" and tokens[i + 1][1] in _COMPARE:
        if i + 2 >= len(tokens) or tokens[i + 2][0] != "num":
            return None, i
        literal = tokens[i + 2][1]
        number: float | int = float(literal) if "." in literal else int(literal)
        if isinstance(number, int) and number >= 2**63:
            return None, i
        return _comparison(get, _COMPARE[tokens[i + 1][1]], number), i + 3
    return _value(get), i + 1


def _map_literal(tokens: list[tuple[str, str]], i: int) -> tuple[Native | None, int]:
    """``{'key': path, ...}``: string keys, field paths as values."""
    entries: list[tuple[str, Native]] = []
    while i + 2 < len(tokens) and tokens[i][0] == "str" and tokens[i + 1] == ("punct", ":") and tokens[i + 2][0] == "path":
        key = tokens[i][1][1:-1]
        parts = _path(tokens[i + 2][1])
        if parts is None or any(k == key for k, _ in entries):
            return None, i
        entries.append((key, _value(_getter(parts))))
        i += 3
        if i < len(tokens) and tokens[i] == ("punct", ","):
            i += 1
            continue
        break
    if not entries or i >= len(tokens) or tokens[i] != ("punct", "}"):
        return None, i
    return _mapping(entries), i + 1


def _mapping(entries: list[tuple[str, Native]]) -> Native:
    def build(scope: dict[str, Any]) -> Any:
        out: dict[str, Any] = {}
        for key, value in entries:
            v = value(scope)
            if v is FALLBACK:
                return FALLBACK
            out[key] = v
        return out

    return build


def _path(text: str) -> list[str] | None:
    parts = text.split(".")
    if parts[0] not in _ROOTS or any(p in _RESERVED for p in parts):
        return None
    return parts


def _getter(parts: list[str]) -> Native:
    root, rest = parts[0], parts[1:]

    def get(scope: dict[str, Any]) -> Any:
        value = scope[root]
        for key in rest:
            if type(value) is not dict or key not in value:
                return FALLBACK
            value = value[key]
        return value

    return get


def _has(parts: list[str]) -> Native:
    parent, key = _getter(parts[:-1]), parts[-1]

    def has(scope: dict[str, Any]) -> Any:
        p = parent(scope)
        if type(p) is not dict:
            return FALLBACK
        return key in p

    return has


def _comparison(get: Native, op: Callable[[Any, Any], bool], number: float | int) -> Native:
    kind = type(number)

    def compare(scope: dict[str, Any]) -> Any:
        value = get(scope)
        if type(value) is not kind:  # int with int, double with double; bool is neither
            return FALLBACK
        return op(value, number)

    return compare


def _conjunction(terms: list[Native]) -> Native:
    def conj(scope: dict[str, Any]) -> Any:
        for term in terms:
            value = term(scope)
            if value is False:
                return False  # false && anything is false in CEL, errors included
            if value is not True:
                return FALLBACK
        return True

    return conj


class _Unhandled(Exception):
    pass


def _value(get: Native) -> Native:
    def value(scope: dict[str, Any]) -> Any:
        found = get(scope)
        if found is FALLBACK:
            return FALLBACK
        try:
            return _plain(found)
        except _Unhandled:
            return FALLBACK

    return value


def _plain(value: Any) -> Any:
    """What ``to_python(json_to_cel(value))`` gives: a copy with the same JSON values."""
    t = type(value)
    if t is dict:
        return {_key(k): _plain(v) for k, v in value.items()}
    if t is list or t is tuple:
        return [_plain(v) for v in value]
    if t is str or t is float or t is bool or value is None:
        return value
    if t is int and -(2**63) <= value < 2**63:
        return value
    raise _Unhandled


def _key(k: Any) -> str:
    if type(k) is not str:
        raise _Unhandled
    return k


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
    value = state[key]
    if previous is not _ABSENT and _is_scalar(previous) and _is_scalar(value):
        # a scalar replaced by a scalar (a counter, a last-seen value): no container, count or
        # depth changed, so only the value itself needs a look, not the whole state
        if not (isinstance(value, str) and len(value) > MAX_STRING):
            return
    why = _state_problem(state)
    if why is None:
        return
    _restore(state, key, previous)
    raise PolicyError(f"state.{key} not updated: the state would {why}")


def _restore(state: dict[str, Any], key: str, previous: Any) -> None:
    if previous is _ABSENT:
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
