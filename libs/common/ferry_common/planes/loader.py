"""Reading a plane file (YAML or JSON): the JSON Schema first, then the models, and every
problem said as ``FILE:LINE: FIELD: what is wrong``.

YAML is parsed with PyYAML's safe loader (no tags, nothing constructed but plain data);
the composed node tree keeps each value's line. Aliases are refused: a file that repeats
a node by reference could make validation walk it exponentially often.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from ..messages.plane import PlaneDocument
from .schema import plane_schema

MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_PROBLEMS = 20
Path_ = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    file: str
    line: int  # 1-based; 0 when the file as a whole is wrong
    field: str  # dotted path into the document, e.g. ``embots.0.policies.1.condition``
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field or '<document>'}: {self.message}"


class PlaneFileError(ValueError):
    """A plane file that cannot be used; ``problems`` says where and why."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class _Lines:
    """Each value's 1-based line, by its path in the document."""

    def __init__(self, root: yaml.Node | None) -> None:
        self.lines: dict[Path_, int] = {}
        self.shared = False
        seen: set[int] = set()
        todo: list[tuple[yaml.Node, Path_]] = [(root, ())] if root is not None else []
        while todo:
            node, path = todo.pop()
            if id(node) in seen:
                self.shared = True  # an alias: the same node twice
                continue
            seen.add(id(node))
            self.lines[path] = node.start_mark.line + 1
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    if isinstance(k, yaml.ScalarNode):
                        # a key's own line for a missing-or-extra field under it
                        self.lines[(*path, k.value, "<key>")] = k.start_mark.line + 1
                        todo.append((v, (*path, k.value)))
            elif isinstance(node, yaml.SequenceNode):
                todo.extend((v, (*path, i)) for i, v in enumerate(node.value))

    def line(self, path: Path_) -> int:
        """The line of ``path``, or of the nearest enclosing value the file has."""
        p = tuple(path)
        if (*p, "<key>") in self.lines:
            return self.lines[(*p, "<key>")]
        while p and p not in self.lines:
            p = p[:-1]
        return self.lines.get(p, 1)


def parse_plane(text: str, file: str) -> PlaneDocument:
    """The document in ``text`` (YAML, or JSON which is YAML too), checked against the schema
    and the models; :class:`PlaneFileError` names every problem's line and field."""
    if len(text.encode()) > MAX_FILE_BYTES:
        raise PlaneFileError([Problem(file, 0, "", f"larger than {MAX_FILE_BYTES} bytes")])
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        lines = _Lines(root)
        if lines.shared:
            raise PlaneFileError([Problem(file, 0, "", "YAML aliases (*name) are not allowed in a plane file")])
        data = json.loads(text) if file.endswith(".json") else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else getattr(exc, "lineno", 0)
        raise PlaneFileError([Problem(file, line, "", f"not valid {'JSON' if file.endswith('.json') else 'YAML'}: "
                                      f"{getattr(exc, 'problem', None) or getattr(exc, 'msg', None) or exc}")]) from None
    return validate_plane(data, file, lines)


def validate_plane(data: Any, file: str, lines: _Lines | None = None) -> PlaneDocument:
    lines = lines or _Lines(None)
    validator = Draft202012Validator(plane_schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: (lines.line(tuple(e.absolute_path)), list(e.absolute_path)))
    if errors:
        raise PlaneFileError([_schema_problem(file, lines, e) for e in errors[:MAX_PROBLEMS]])
    try:
        return PlaneDocument.model_validate(data)
    except ValidationError as exc:  # what a schema cannot say: nesting depth and size of free-form values
        raise PlaneFileError([
            Problem(file, lines.line(tuple(e["loc"])), _dotted(e["loc"]), e["msg"])
            for e in exc.errors()[:MAX_PROBLEMS]
        ]) from None


def _schema_problem(file: str, lines: _Lines, error: Any) -> Problem:
    path = tuple(error.absolute_path)
    message = error.message
    if error.validator == "anyOf" and error.context:
        # a union (a policy by name or in full): the branch that came nearest says it best
        best = max(error.context, key=lambda e: len(e.absolute_path))
        path, message = tuple(best.absolute_path), best.message
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        if extra:
            path, message = (*path, extra[0]), f"unknown field {extra[0]!r}"
    if len(message) > 300:
        message = message[:300] + "…"
    return Problem(file, lines.line(path), _dotted(path), message)


def _dotted(path: Path_ | list[Any]) -> str:
    return ".".join(str(p) for p in path)


def load_plane(path: str | Path) -> PlaneDocument:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PlaneFileError([Problem(str(p), 0, "", f"cannot be read: {exc}")]) from None
    return parse_plane(text, str(p))
