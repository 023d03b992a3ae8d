"""``ferry vm create|adopt|release|show`` and ``ferry events``: a VM with its management
plane, a guest the hypervisor already runs, and service-plane events sent to a VM."""

from __future__ import annotations

import asyncio
import sys
import time
from enum import StrEnum
from typing import Annotated, Any

import typer

from . import runtime, views
from .runtime import Json

vm_app = typer.Typer(help="create a VM with its management graph, or show one", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """``ferry events`` (``ferry vm`` joins as a group of its own)."""
    app.command()(events)


@vm_app.command("create")
def vm_create(vm: str, host: Annotated[str, typer.Option("--on", help="host to create it on")],
              memory: Annotated[int, typer.Option(help="MiB")] = 1024,
              param: Annotated[list[str] | None, typer.Option("--param", help="driver parameter KEY=VALUE")] = None,
              elements: Annotated[int, typer.Option(help="extra managed elements")] = 0) -> None:
    """create a VM with a sample management graph"""
    from ferry_testing.sample import MODULES, graph, vm_spec

    async def go() -> int:
        async with runtime.connect() as client:
            spec = vm_spec(vm, memory_mib=memory, **runtime.parse_params(param))
            await client.create_vm(host, spec, graph(vm, extra_elements=elements), MODULES)
        print(f"created {vm} on {host}")
        return 0

    runtime.run(go())


class StorageMode(StrEnum):
    shared = "shared"
    copy = "copy"


@vm_app.command("adopt")
def vm_adopt(domain: Annotated[str, typer.Argument(help="the defined domain's name or UUID")],
             host: Annotated[str, typer.Option("--on", help="the host whose libvirt defines it")],
             plane: Annotated[str, typer.Option(help="'sample', or a plane file (docs/planes.md)")] = "sample",
             storage: Annotated[StorageMode, typer.Option(help="how its disks migrate (docs/operations.md)")]
             = StorageMode.shared) -> None:
    """manage a guest the host's hypervisor already runs (libvirt)"""
    from .adopt import load_plane

    try:
        plane_for, modules = load_plane(plane)
    except ValueError as exc:
        print(f"ferry vm adopt: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None

    async def go() -> int:
        async with runtime.connect() as client:
            spec = await client.adopt_vm(host, domain, plane_for, modules, storage=storage.value)
        print(f"adopted {spec.vm_id} on {host} (storage {spec.params.get('storage')}, "
              f"{len(spec.params.get('disks') or [])} disks)")
        return 0

    runtime.run(go())


@vm_app.command("release")
def vm_release(vm: str, host: Annotated[str, typer.Option("--on", help="the VM's host")]) -> None:
    """stop managing an adopted guest (it runs on, still defined)"""
    runtime.act(lambda client: client.release_vm(host, vm), f"released {vm} on {host}: it runs on, no longer managed")


@vm_app.command("show")
def vm_show(vm: str, as_json: Json = False) -> None:
    """where a VM and its management plane are, and their state"""

    async def fetch(client: Any) -> dict[str, Any]:
        placement = await client.placement()
        seen = {h: await client.inspect(h, vm) for h in sorted(placement)}
        return views.vm_view(vm, placement, seen)

    runtime.show(fetch, views.vm_table, as_json)


def events(vm: str, count: Annotated[int, typer.Option()] = 10,
           rate: Annotated[float, typer.Option(help="per second (0: as fast as possible)")] = 0.0,
           batch: Annotated[int, typer.Option(help="events per message (VmEventBatch, at most 1000)")] = 1) -> None:
    """send service-plane events to a VM"""
    from ferry_common.messages.public import MAX_BATCH, VmEvent
    from ferry_testing.sample import event

    if not 1 <= batch <= MAX_BATCH:
        print(f"--batch must be between 1 and {MAX_BATCH}", file=sys.stderr)
        runtime.exit_with(2)

    async def go() -> int:
        async with runtime.connect() as client:
            pending: list[VmEvent] = []
            for n in range(count):
                ev = event(vm, n, time.time())
                pending.append(VmEvent.model_validate(ev.model_dump() | {"id": f"{ev.id}-{time.time_ns()}"}))
                if len(pending) == batch or n == count - 1:
                    if len(pending) == 1 and batch == 1:
                        await client.send_event(pending[0])
                    else:
                        await client.send_batch(vm, pending)
                    pending = []
                if rate:
                    await asyncio.sleep(1.0 / rate)
        print(f"sent {count} events to {vm}")
        return 0

    runtime.run(go())
