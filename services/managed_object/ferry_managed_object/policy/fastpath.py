"""The native fast path: the expressions policies use most, answered without cel-python.

It answers the common case exactly as CEL would and hands everything else (a missing key,
a type it does not handle, an error) back to cel-python by returning :data:`FALLBACK`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

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

