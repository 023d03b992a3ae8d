"""A plane document written out as a file: YAML or JSON, in the form a person writes it
(defaults left out, fields in the models' order), which :func:`.loader.parse_plane` reads
back to the same document."""

from __future__ import annotations

import json
from typing import Any, Literal

import yaml

from ..messages.plane import PlaneDocument

Format = Literal["yaml", "json"]


class _Dumper(yaml.SafeDumper):
    """Block style, keys in the models' order, lists indented under their key."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> Any:
        return super().increase_indent(flow, False)


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    # expressions span lines rarely; when they do, a block keeps them readable
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def as_data(doc: PlaneDocument) -> dict[str, Any]:
    return doc.model_dump(mode="json", exclude_defaults=True)


def render_plane(doc: PlaneDocument, fmt: Format = "yaml") -> str:
    data = as_data(doc)
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    return str(yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=None, allow_unicode=True, width=100))
