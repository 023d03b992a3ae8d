"""Plane files: the schema is the models' and is committed as generated; a bad file's every
problem names its file, line and field; what is rendered reads back as the same document."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ferry_common.messages.plane import PlaneDocument
from ferry_common.planes import schema
from ferry_common.planes.convert import PlaneError, retarget, to_document, to_graph
from ferry_common.planes.loader import PlaneFileError, load_plane, parse_plane
from ferry_common.planes.render import render_plane
from ferry_testing.sample import MODULES, graph

EXAMPLES = sorted(Path(__file__).resolve().parents[2].joinpath("examples").glob("*.*"))


def problems(text: str, file: str = "plane.yaml") -> list[str]:
    with pytest.raises(PlaneFileError) as err:
        parse_plane(text, file)
    return [str(p) for p in err.value.problems]


def test_the_committed_schema_is_the_one_the_models_generate() -> None:
    assert schema.COMMITTED.exists(), "docs/schemas/plane.schema.json is missing"
    assert json.loads(schema.COMMITTED.read_text()) == schema.plane_schema()
    assert schema.main(["--check"]) == 0


def test_schema_check_fails_on_a_stale_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = tmp_path / "plane.schema.json"
    stale.write_text(schema.rendered().replace('"maxLength": 128', '"maxLength": 129', 1))
    monkeypatch.setattr(schema, "COMMITTED", stale)
    assert schema.main(["--check"]) == 1


BAD = """\
vm: web-01
modules:
  - name: ferry.core
    version: 1.0
    element_types: [vm]
elements:
  - id: web-01
    type: vm
    module: ferry.core@1.0
    colour: red
embots:
  - id: web-01.load
    module: ferry.core@1.0
    elements: []
    policies:
      - count-high-load
      - name: p
        trigger: [cpu.load]
        actions:
          - kind: explode
"""


def test_schema_errors_name_file_line_and_field() -> None:
    assert problems(BAD, "web.yaml") == [
        "web.yaml:4: modules.0.version: 1.0 is not of type 'string'",
        "web.yaml:10: elements.0.colour: unknown field 'colour'",
        "web.yaml:14: embots.0.elements: [] should be non-empty",
        "web.yaml:20: embots.0.policies.1.actions.0.kind: 'explode' is not one of "
        "['set', 'increment', 'alarm', 'clear_alarm', 'emit', 'migrate']",
    ]


def test_a_missing_field_is_named_where_its_object_starts() -> None:
    text = "vm: x\nelements:\n  - id: x\n    module: m@1\n"
    assert problems(text) == ["plane.yaml:3: elements.0: 'type' is a required property"]


def test_json_files_are_checked_with_their_lines() -> None:
    text = '{\n  "vm": "x",\n  "elements": [\n    {"id": "x", "type": "vm", "module": "m@1",\n     "depends_on": ["bad id"]}\n  ]\n}\n'
    (only,) = problems(text, "plane.json")
    assert only.startswith("plane.json:5: elements.0.depends_on.0: 'bad id' does not match")


def test_what_the_schema_cannot_say_is_named_too() -> None:
    deep = "a: " * 0 + "{x: " * 12 + "1" + "}" * 12
    text = f"vm: x\nelements:\n  - id: x\n    type: vm\n    module: m@1\n    attributes: {deep}\n"
    (only,) = problems(text)
    assert only.startswith("plane.yaml:6: elements.0.attributes:") and "nested deeper" in only


def test_not_yaml_and_aliases_are_refused_with_a_reason() -> None:
    assert problems("vm: [x\n")[0].startswith("plane.yaml:2: <document>: not valid YAML")
    bomb = "vm: x\nelements:\n  - &e {id: x, type: vm, module: m@1}\n  - *e\n"
    assert problems(bomb) == ["plane.yaml: <document>: YAML aliases (*name) are not allowed in a plane file"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_reads_and_renders_back_the_same(path: Path) -> None:
    doc = load_plane(path)
    graph_, modules = to_graph(doc, lambda key: None)
    lookup = {f"{m.name}@{m.version}": m for m in modules}.get
    # the graph written as a document is the file's document: policies named stay named
    assert to_document(graph_, lookup) == doc
    for fmt in ("yaml", "json"):
        assert parse_plane(render_plane(doc, fmt), f"again.{fmt}") == doc


def test_the_demo_sample_is_the_web_server_example() -> None:
    doc = load_plane(next(p for p in EXAMPLES if p.name == "web-server.yaml"))
    wanted, _ = to_graph(retarget(doc, "vm9"), {m.ref().key: m for m in MODULES}.get)
    assert graph("vm9") == wanted
    assert {e.id for e in wanted.elements} >= {"vm9", "vm9.disk0", "vm9.svc2"}
    assert wanted.embots[1].elements == ["vm9.disk0", "vm9.disk1"]


def test_policies_by_name_come_from_the_module_or_what_it_depends_on() -> None:
    doc = load_plane(next(p for p in EXAMPLES if p.name == "cache.json"))
    g, _ = to_graph(doc, lambda key: None)
    assert [p.name for p in g.embots[0].policies] == ["hit-ratio", "cold-cache", "count-evictions"]
    broken = PlaneDocument.model_validate(
        doc.model_dump() | {"embots": [doc.embots[0].model_dump() | {"policies": ["nope"]}]})
    with pytest.raises(PlaneError, match="no policy 'nope'"):
        to_graph(broken, lambda key: None)
    lone = PlaneDocument.model_validate(doc.model_dump() | {"modules": doc.modules[1:]})
    with pytest.raises(PlaneError, match="depends on ferry.core@1.0, which is neither in the file nor installed"):
        to_graph(lone, lambda key: None)
