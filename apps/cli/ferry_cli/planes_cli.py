"""``ferry plane apply`` and ``ferry plane get``: a VM's management plane as a file (docs/planes.md)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from . import runtime

plane_app = typer.Typer(help="a VM's management plane as a YAML or JSON file", no_args_is_help=True)


class PlaneFormat(StrEnum):
    yaml = "yaml"
    json = "json"


OnHost = Annotated[str | None, typer.Option("--on", help="the VM's host (default: where the coordinator sees it)")]


@plane_app.command("apply")
def plane_apply(file: Annotated[str, typer.Option("-f", "--file", help="the plane file (YAML or JSON)")],
                vm: Annotated[str | None, typer.Option(help="apply it to this VM instead of the file's")] = None,
                host: OnHost = None) -> None:
    """create or update a VM's plane from a file (idempotent)"""
    from ferry_common.planes.commands import apply_command, read_plane

    doc = read_plane(file, vm)
    if doc is None:
        raise typer.Exit(2)

    async def go() -> int:
        async with runtime.connect() as client:
            return await apply_command(client.endpoint, doc, host=host)

    runtime.run(go())


@plane_app.command("get")
def plane_get(vm: str, output: Annotated[PlaneFormat, typer.Option("-o", "--output")] = PlaneFormat.yaml,
              host: OnHost = None) -> None:
    """print a VM's plane as a file"""
    from ferry_common.planes.commands import get_command

    async def go() -> int:
        async with runtime.connect() as client:
            return await get_command(client.endpoint, vm, fmt=output.value, host=host)

    runtime.run(go())
