"""The management plane an operator gives a guest they adopt: the sample, or a plane file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from ferry_common.messages.commands import RegisterManagementGraph
from ferry_common.messages.domain import ManagementGraph, Module
from ferry_common.planes.convert import PlaneError, modules_of, retarget, to_graph
from ferry_common.planes.loader import PlaneFileError
from ferry_common.planes.loader import load_plane as load_plane_file

from .sample import MODULES, graph

PlaneFor = Callable[[str], ManagementGraph]


def load_plane(source: str) -> tuple[PlaneFor, list[Module]]:
    """``sample``, a plane file (YAML or JSON, docs/planes.md) or a JSON RegisterManagementGraph
    body: a function giving the plane for the adopted VM's id, and its modules. ``ValueError``
    names the file and what is wrong with it."""
    if source == "sample":
        return (lambda vm_id: graph(vm_id)), MODULES
    path = Path(source)
    try:
        raw = json.loads(path.read_text()) if path.suffix == ".json" else None
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: line {exc.lineno}: {exc.msg}") from None
    if isinstance(raw, dict) and "graph" in raw:
        return _register_body(path, raw)
    return _plane_file(path)


def _plane_file(path: Path) -> tuple[PlaneFor, list[Module]]:
    try:
        doc = load_plane_file(path)
        modules = modules_of(doc, lambda key: None)
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    except (PlaneFileError, PlaneError) as exc:
        raise ValueError(str(exc)) from None
    lookup = {m.ref().key: m for m in modules}.get

    def plane(vm_id: str) -> ManagementGraph:
        return to_graph(retarget(doc, vm_id), lookup)[0]

    return plane, modules


def _register_body(path: Path, raw: dict[str, object]) -> tuple[PlaneFor, list[Module]]:
    try:
        body = RegisterManagementGraph.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ValueError(f"{path}: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None

    def plane(vm_id: str) -> ManagementGraph:
        if body.graph.vm_id != vm_id:
            raise ValueError(f"{path}: the plane is for vm {body.graph.vm_id!r}, not {vm_id!r}")
        return body.graph

    return plane, body.modules

