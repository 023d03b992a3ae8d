"""The management plane an operator gives a guest they adopt: the sample graph or a file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from ferry_common.messages.commands import RegisterManagementGraph
from ferry_common.messages.domain import ManagementGraph, Module

from .sample import MODULES, graph


def load_plane(source: str) -> tuple[Callable[[str], ManagementGraph], list[Module]]:
    """``sample``, or a JSON file holding a RegisterManagementGraph body (``graph``,
    ``modules``): a function giving the plane for the adopted VM's id, and its modules.
    ``ValueError`` names the file and what is wrong with it."""
    if source == "sample":
        return (lambda vm_id: graph(vm_id)), MODULES
    path = Path(source)
    try:
        body = RegisterManagementGraph.model_validate(json.loads(path.read_text()))
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: line {exc.lineno}: {exc.msg}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ValueError(f"{path}: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None

    def plane(vm_id: str) -> ManagementGraph:
        if body.graph.vm_id != vm_id:
            raise ValueError(f"{path}: the plane is for vm {body.graph.vm_id!r}, not {vm_id!r}")
        return body.graph

    return plane, body.modules
