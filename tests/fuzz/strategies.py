"""Hypothesis strategies for hostile message bodies.

``model_payload(model)`` walks a wire model's fields (and their pydantic constraints)
and draws JSON dicts that mostly validate, with ids drawn from a small pool so that
handlers meet real state. ``mutated(model)`` takes such a payload and changes one
thing: a value replaced by something hostile (spliced in as raw bytes, so NaN, huge
numbers, invalid UTF-8 and 5,000-deep nesting reach the decoder), a field removed,
or an unknown field added. ``garbage()`` is the rest: random bytes, text, JSON of
the wrong shape.
"""

from __future__ import annotations

import os
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import orjson
from hypothesis import strategies as st
from pydantic import BaseModel, StringConstraints

SOAK = os.environ.get("FERRY_SOAK") == "1"
# a pool of ids that exist in the fuzzed cluster (vm1 runs on host-a), and some that do not
IDS = ("vm1", "vm1.disk0", "vm1.load", "host-a", "host-b", "host-c", "m-1", "nope", "ferry.core@1.0", "x")
HOLE = "\x00__hole__\x00"
HOLE_JSON = orjson.dumps(HOLE)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
small_json_object = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
EXPRESSIONS = st.sampled_from(
    [
        "true",
        "event.data.value > 0.8",
        "has(state.n) ? state.n + 1 : 1",
        "1 / 0",  # raises when evaluated
        "event.nope.deeper",  # raises when evaluated
        "((",  # does not compile
        "size(event.id)",
    ]
) | st.text(min_size=1, max_size=40)


def _constraint(metadata: list[Any], kind: type, attr: str) -> Any:
    for m in metadata:
        if isinstance(m, kind):
            return getattr(m, attr)
        if isinstance(m, StringConstraints) and kind is StringConstraints:
            return getattr(m, attr)
    return None


def _string(metadata: list[Any]) -> st.SearchStrategy[str]:
    pattern = _constraint(metadata, StringConstraints, "pattern")
    max_len = _constraint(metadata, StringConstraints, "max_length") or 64
    min_len = _constraint(metadata, StringConstraints, "min_length") or 0
    if pattern is not None and "0-9a-f]{64}" in pattern:
        return st.from_regex(r"\A[0-9a-f]{64}\Z")
    if pattern is not None:
        made = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:@/-]{0,15}\Z")
        return st.sampled_from(IDS) | made
    if max_len == 1024:  # an Expression
        return EXPRESSIONS
    return st.text(min_size=min_len, max_size=min(max_len, 40))


def for_annotation(ann: Any, metadata: list[Any] | None = None) -> st.SearchStrategy[Any]:
    """Mostly valid JSON for a field annotated ``ann`` with pydantic ``metadata``."""
    metadata = list(metadata or [])
    origin = get_origin(ann)
    if origin is Annotated:
        base, *extra = get_args(ann)
        return for_annotation(base, [*metadata, *extra])
    if origin in (Union, types.UnionType):
        return st.one_of([for_annotation(a, metadata) for a in get_args(ann)])
    if origin is Literal:
        return st.sampled_from(get_args(ann))
    if origin is list:
        lo = _constraint(metadata, annotated_types.MinLen, "min_length") or 0
        hi = _constraint(metadata, annotated_types.MaxLen, "max_length") or 3
        return st.lists(for_annotation(get_args(ann)[0]), min_size=lo, max_size=min(hi, lo + 3))
    if origin is dict:
        return small_json_object
    if ann is type(None):
        return st.none()
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return model_payload(ann)
    if ann is str:
        return _string(metadata)
    if ann is bool:
        return st.booleans()
    if ann is int:
        lo = _constraint(metadata, annotated_types.Ge, "ge")
        hi = _constraint(metadata, annotated_types.Le, "le")
        return st.integers(min_value=lo if lo is not None else -5, max_value=min(hi or 4096, 4096))
    if ann is float:
        return st.floats(min_value=0, max_value=2e9, allow_nan=False)
    return json_values


def model_payload(model: type[BaseModel]) -> st.SearchStrategy[dict[str, Any]]:
    """A JSON dict for ``model`` that validates most of the time."""
    required: dict[str, st.SearchStrategy[Any]] = {}
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for name, f in model.model_fields.items():
        strat = for_annotation(f.annotation, list(f.metadata))
        (required if f.is_required() else optional)[name] = strat
    return st.fixed_dictionaries(required, optional=optional)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.extend(_paths(v, (*prefix, i)))
    return out


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replace(value[head], rest, new)}
    copy = list(value)
    copy[head] = _replace(copy[head], rest, new)
    return copy


# raw JSON fragments spliced in where a value was: what orjson.dumps would never write
RAW_HOSTILE: list[bytes] = [
    b"NaN",
    b"-Infinity",
    b"1e400",
    b"-1",
    b"-0.0",
    b"123456789012345678901234567890",
    b"18446744073709551616",
    b"9223372036854775807",
    b"true",
    b"null",
    b"{}",
    b"[]",
    b'""',
    b'" "',
    b'"\\u0000"',
    b'"\\ud800"',  # a lone surrogate
    b'"\xff\xfe"',  # invalid UTF-8
    '"\u202evm1\u200b"'.encode(),
    '"\U0001f4a5\U0001f4a5"'.encode(),
    b'"../../etc/passwd"',
    b'"vm1 "',
    b'"' + b"a" * 129 + b'"',
    b'"' + b"x" * 5000 + b'"',
    b'"' + b"x" * 70_000 + b'"',
    b"[" * 5000 + b"]" * 5000,  # deeper than any parser should follow
    b'{"a":' * 40 + b"1" + b"}" * 40,
    b"[" + b",".join([b"0"] * 300) + b"]",
    b"[" + b",".join([b'"vm1"'] * 25_000) + b"]",
    b"{" + b",".join(b'"k%d":1' % i for i in range(300)) + b"}",
    b'{"vm_id":"vm1","id":"vm1"}',
]


@st.composite
def mutated(draw: st.DrawFn, model: type[BaseModel]) -> bytes:
    """A payload for ``model`` with one thing changed; raw bytes, not always JSON."""
    payload = draw(model_payload(model))
    paths = _paths(payload)
    how = draw(st.sampled_from(["replace", "replace", "replace", "drop", "extra", "wrap"]))
    if how == "drop" and paths:
        path = draw(st.sampled_from(paths))
        parent = payload
        for p in path[:-1]:
            parent = parent[p]
        if isinstance(parent, dict):
            del parent[path[-1]]
        else:
            del parent[path[-1]]
        return orjson.dumps(payload)
    if how == "extra":
        key = draw(st.text(max_size=10) | st.sampled_from(["type", "__class__", "vm_id ", "VM_ID"]))
        if key in payload:
            key += "_"
        payload[key] = draw(json_values)
        return orjson.dumps(payload)
    if how == "wrap":
        return orjson.dumps(draw(st.sampled_from([[payload], {"body": payload}, {"data": [payload]}])))
    if not paths:
        paths = [("vm_id",)]
        payload["vm_id"] = "vm1"
    path = draw(st.sampled_from(paths))
    body = orjson.dumps(_replace(payload, path, HOLE))
    raw = draw(st.sampled_from(RAW_HOSTILE) | json_values.map(orjson.dumps))
    return body.replace(HOLE_JSON, raw, 1)


def garbage() -> st.SearchStrategy[bytes]:
    """Bodies that are not a JSON object of any model."""
    return st.one_of(
        st.binary(max_size=512),
        st.text(max_size=200).map(str.encode),
        json_values.filter(lambda v: not isinstance(v, dict)).map(orjson.dumps),
        small_json_object.map(orjson.dumps),
        st.sampled_from([b"", b"{", b"{}", b"null", b'{"a":1}{"b":2}', b"\xef\xbb\xbf{}", b"[" * 3000]),
    )
