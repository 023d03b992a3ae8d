"""``ferry host``: drain a host for maintenance, cancel a drain, uncordon, undrain.

The commands publish the public drain messages (``ferry_common.messages.drains``) and follow
``host.<host>.drain.<status>``; the functions taking a :class:`FerryClient` do the work, so
tests run them against a cluster without a process of their own.
"""

from __future__ import annotations

import asyncio
import json
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ferry_common.bus.interfaces import QueueSpec
from ferry_common.bus.topology import (
    COORDINATOR_QUERY,
    HOST_DRAIN_CANCEL,
    HOST_DRAIN_REQUEST,
    HOST_UNCORDON,
    drain_status,
)
from ferry_common.endpoint import Context, Router
from ferry_common.errors import FerryError
from ferry_common.messages.drains import (
    DrainCancel,
    DrainPlan,
    DrainRequest,
    DrainStatusEvent,
    GetDrain,
    HostUncordon,
)

from . import runtime
from .client import FerryClient

host_app = typer.Typer(help="host maintenance: drain, cancel-drain, uncordon, undrain, fault", no_args_is_help=True)

#: exit codes: 0 the host is empty; 1 the drain ended otherwise; 3 a dry run found unmovable VMs
NOT_EMPTY, UNMOVABLE = 1, 3


class OnUnmovable(StrEnum):
    block = "block"
    leave = "leave"


def plan_table(console: Console, plan: DrainPlan) -> None:
    t = Table(title=f"drain plan of {plan.host}: {len(plan.vms)} VMs, {plan.parallel} at a time, ~{plan.estimate_s:.1f} s")
    for col in ("order", "vm", "target", "left after (s)"):
        t.add_column(col)
    for p in plan.vms:
        t.add_row(str(p.order + 1), p.vm_id, p.target or "-", f"{p.estimate_s:.1f}")
    console.print(t)
    for p in plan.unmovable:
        console.print(f"cannot move {p.vm_id}: {p.reason}", markup=False)


def status_line(e: DrainStatusEvent) -> str:
    eta = f", ~{e.eta_s:.0f} s left" if e.eta_s else ""
    line = (f"drain {e.drain_id} of {e.host}: {e.status}; {e.done}/{e.total} moved, {e.failed} failed, "
            f"{e.in_flight} in flight, {e.queued} queued, {e.unmovable} unmovable{eta}")
    return line + (f" ({e.reason})" if e.reason else "")


async def follow_drain(client: FerryClient, host: str, *, timeout: float, console: Console,
                       poll_s: float = 1.0) -> DrainStatusEvent:
    """Show the drain of ``host`` until it ended and nothing of it is in flight; its last status.
    Events drive the bar; the coordinator is asked every ``poll_s`` (an event can be lost)."""
    events: asyncio.Queue[DrainStatusEvent] = asyncio.Queue()
    router = Router()
    router.route_key(drain_status(host, "*"), DrainStatusEvent)

    async def on(msg: DrainStatusEvent, ctx: Context) -> None:
        events.put_nowait(msg)

    router.add(DrainStatusEvent, on)
    consumer = await client.endpoint.serve(
        QueueSpec(f"drain.{client.endpoint.instance}.{host}", (drain_status(host, "*"),), durable=False), router)
    try:
        return await _show(client, host, events, timeout=timeout, console=console, poll_s=poll_s)
    finally:
        await consumer.cancel()


async def _show(client: FerryClient, host: str, events: asyncio.Queue[DrainStatusEvent], *, timeout: float,
                console: Console, poll_s: float) -> DrainStatusEvent:
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console,
                        disable=not console.is_terminal)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = await get_drain(client, host)
    with progress:
        task = progress.add_task(f"draining {host}", total=last.total, detail="")
        while True:
            ended = last.done + last.failed + last.unmovable
            eta = f", ~{last.eta_s:.0f} s left" if last.eta_s else ""
            progress.update(task, total=last.total, completed=ended,
                            detail=f"{last.in_flight} in flight, {last.queued} queued, {last.failed} failed{eta}")
            if not console.is_terminal:
                console.print(status_line(last), markup=False)
            if last.status != "draining" and last.in_flight == 0 and last.queued == 0:
                return last
            if loop.time() > deadline:
                raise TimeoutError(f"the drain of {host} did not end within {timeout:g} s")
            try:
                last = await asyncio.wait_for(events.get(), poll_s)
            except TimeoutError:
                last = await get_drain(client, host)


async def get_drain(client: FerryClient, host: str) -> DrainStatusEvent:
    ans = await client.endpoint.request(COORDINATOR_QUERY, GetDrain(host=host), timeout=client.timeout)
    assert isinstance(ans, DrainStatusEvent)
    return ans


async def run_drain(client: FerryClient, host: str, *, console: Console, dry_run: bool = False,
                    deadline: float | None = None, on_unmovable: str = "block", attempts: int = 3,
                    wait: bool = True, timeout: float = 3600.0, as_json: bool = False) -> int:
    req = DrainRequest(host=host, dry_run=dry_run, deadline_s=deadline, on_unmovable=on_unmovable,  # type: ignore[arg-type]
                       max_attempts=attempts)
    ans = await client.endpoint.request(HOST_DRAIN_REQUEST, req, timeout=client.timeout)
    if isinstance(ans, DrainPlan):
        if as_json:
            print(json.dumps(ans.model_dump(mode="json"), indent=2))
        else:
            plan_table(console, ans)
        return UNMOVABLE if ans.unmovable else 0
    assert isinstance(ans, DrainStatusEvent)
    console.print(status_line(ans), markup=False)
    if not wait:
        return 0
    end = await follow_drain(client, host, timeout=timeout, console=console)
    console.print(status_line(end), markup=False)
    left = (await client.placement()).get(host, [])
    if left:
        console.print(f"{host} still runs: {', '.join(sorted(left))}", markup=False)
    return 0 if end.status == "drained" and not left else NOT_EMPTY


async def run_cancel(client: FerryClient, host: str, *, abort: bool, console: Console) -> int:
    ans = await client.endpoint.request(HOST_DRAIN_CANCEL, DrainCancel(host=host, abort=abort), timeout=client.timeout)
    assert isinstance(ans, DrainStatusEvent)
    console.print(status_line(ans), markup=False)
    return 0


async def run_uncordon(client: FerryClient, host: str, *, return_vms: bool, console: Console) -> int:
    ans = await client.endpoint.request(HOST_UNCORDON, HostUncordon(host=host, return_vms=return_vms), timeout=client.timeout)
    assert isinstance(ans, DrainStatusEvent)
    moved = ans.done
    console.print(f"{host} uncordoned" + (f"; {moved} VMs queued to come back" if return_vms else ""), markup=False)
    return 0


def _go(work: Any) -> None:
    async def go() -> int:
        try:
            async with runtime.connect() as client:
                return int(await work(client))
        except FerryError as exc:
            print(f"ferry: {exc.reason}")
            return 2

    runtime.run(go())


@host_app.command("drain")
def drain(host: str,
          dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan, change nothing")] = False,
          deadline: Annotated[float | None, typer.Option("--deadline", help="seconds; then the drain ends failed")] = None,
          on_unmovable: Annotated[OnUnmovable, typer.Option("--on-unmovable")] = OnUnmovable.block,
          attempts: Annotated[int, typer.Option("--attempts", help="migrations tried per VM")] = 3,
          no_wait: Annotated[bool, typer.Option("--no-wait")] = False,
          timeout: Annotated[float, typer.Option()] = 3600.0,
          as_json: Annotated[bool, typer.Option("--json", help="the dry run's plan as JSON")] = False) -> None:
    """cordon HOST and move every VM away; exit 0 only when the host is empty"""
    _go(lambda c: run_drain(c, host, console=runtime.console(), dry_run=dry_run, deadline=deadline,
                            on_unmovable=on_unmovable.value, attempts=attempts, wait=not no_wait,
                            timeout=timeout, as_json=as_json))


@host_app.command("cancel-drain")
def cancel_drain(host: str,
                 abort: Annotated[bool, typer.Option("--abort", help="also roll back migrations in flight")] = False) -> None:
    """stop draining HOST: nothing more starts (the host stays cordoned)"""
    _go(lambda c: run_cancel(c, host, abort=abort, console=runtime.console()))


@host_app.command("uncordon")
def uncordon(host: str) -> None:
    """let placement choose HOST again"""
    _go(lambda c: run_uncordon(c, host, return_vms=False, console=runtime.console()))


@host_app.command("undrain")
def undrain(host: str,
            return_vms: Annotated[bool, typer.Option("--return", help="move back the VMs the drain moved away")] = False) -> None:
    """uncordon HOST and, with --return, bring its VMs back"""
    _go(lambda c: run_uncordon(c, host, return_vms=return_vms, console=runtime.console()))
