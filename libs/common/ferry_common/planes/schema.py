"""The JSON Schema of a plane file, generated from :class:`PlaneDocument`; the committed copy
(docs/schemas/plane.schema.json) must be what this generates.

    python -m ferry_common.planes.schema            # print it
    python -m ferry_common.planes.schema --write    # update the committed copy
    python -m ferry_common.planes.schema --check    # exit 1 if the committed copy is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import cache
from pathlib import Path
from typing import Any

from ..messages.plane import PlaneDocument

SCHEMA_ID = "https://ferry.dev/schemas/plane.schema.json"
# the repository's copy, beside the docs (an installed package has none: ``--check`` says so)
COMMITTED = Path(__file__).resolve().parents[4] / "docs" / "schemas" / "plane.schema.json"


@cache
def plane_schema() -> dict[str, Any]:
    schema = PlaneDocument.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, **schema}


def rendered() -> str:
    return json.dumps(plane_schema(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ferry_common.planes.schema")
    p.add_argument("--write", action="store_true", help=f"write {COMMITTED}")
    p.add_argument("--check", action="store_true", help="exit 1 if the committed schema is stale")
    args = p.parse_args(argv)
    if args.write:
        COMMITTED.parent.mkdir(parents=True, exist_ok=True)
        COMMITTED.write_text(rendered())
        return 0
    if args.check:
        if not COMMITTED.exists() or COMMITTED.read_text() != rendered():
            print(f"{COMMITTED} is not what the models generate: run python -m ferry_common.planes.schema --write",
                  file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(rendered())
    return 0


if __name__ == "__main__":
    sys.exit(main())
