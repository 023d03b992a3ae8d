"""``ferry recommendations``, ``ferry automation`` and ``ferry host fault``: the balancer's
recommendations and automation level, and a host fault reported by an outside agent
(docs/balancing.md, docs/operations.md#automation-levels)."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from ferry_common.bus.topology import COORDINATOR_QUERY, host_event
from ferry_common.errors import FerryError
from ferry_common.ids import new_id
from ferry_common.messages.commands import Done
from ferry_common.messages.host_events import HostFaultEvent
from ferry_common.messages.recommendations import (
    ApplyRecommendation,
    ListRecommendations,
    RecommendationList,
    SetAutomationLevel,
)

from . import runtime
from .hosts_cli import host_app  # `ferry host fault` joins the drain commands

recommendations_app = typer.Typer(help="the balancer's recommendations: list them, or apply one",
                                  invoke_without_command=True)
automation_app = typer.Typer(help="the cluster's automation level (manual, partial, full)", no_args_is_help=True)

Json = Annotated[bool, typer.Option("--json", help="print JSON for scripts instead of a table")]


def register(app: typer.Typer) -> None:
    app.add_typer(recommendations_app, name="recommendations")
    app.add_typer(automation_app, name="automation")


async def _ask(model: Any) -> Any:
    async with runtime.connect() as client:
        return await client.endpoint.request(COORDINATOR_QUERY, model, timeout=client.timeout)


def _go(coro: Any) -> None:
    async def guarded() -> int:
        try:
            return int(await coro or 0)
        except FerryError as exc:
            typer.echo(f"error: {exc.reason}", err=True)
            return 1
    runtime.run(guarded())


@recommendations_app.callback()
def recommendations(ctx: typer.Context, as_json: Json = False) -> None:
    """list the current recommendations (superseded ones are gone)"""
    if ctx.invoked_subcommand is not None:
        return
    async def go() -> int:
        ans = await _ask(ListRecommendations())
        assert isinstance(ans, RecommendationList)
        if as_json:
            runtime.print_json(ans.model_dump(mode="json"))
            return 0
        console = runtime.console()
        imbalance = "?" if ans.imbalance is None else f"{ans.imbalance:.3f}"
        console.print(f"automation level: {ans.level}   imbalance: {imbalance}   leader: {ans.leader or '-'}")
        for r in ans.recommendations:
            figures = ", ".join(f"{k}={v:g}" for k, v in r.reason.figures.items())
            console.print(f"{r.id}  {r.vm_id}: {r.source_host} -> {r.target_host}  "
                          f"[{r.reason.kind}, {r.reason.policy}] {figures}")
        if not ans.recommendations:
            console.print("no recommendations")
        return 0

    _go(go())


@recommendations_app.command("apply")
def apply(recommendation_id: str) -> None:
    """run one recommendation (refused if it is superseded)"""

    async def go() -> int:
        ans = await _ask(ApplyRecommendation(recommendation_id=recommendation_id, requested_by="client/cli"))
        assert isinstance(ans, Done)
        d = ans.detail
        print(f"{recommendation_id}: queued migration {d['migration_id']} of {d['vm_id']} to {d['target_host']}")
        return 0

    _go(go())


@automation_app.command("set")
def set_level(level: Annotated[str, typer.Argument(help="manual | partial | full")]) -> None:
    """change the cluster's automation level now (every replica, kept across restarts)"""
    if level not in ("manual", "partial", "full"):
        raise typer.BadParameter(f"{level!r} is not one of manual, partial, full")

    async def go() -> int:
        await _ask(SetAutomationLevel(level=level, requested_by="client/cli"))  # type: ignore[arg-type]
        print(f"automation level: {level}")
        return 0

    _go(go())


@host_app.command("fault")
def fault(host: str,
          kind: Annotated[str, typer.Option(help="disk | memory | nic | cpu | power | thermal | other")] = "other",
          severity: Annotated[str, typer.Option(help="info | warning | critical")] = "warning",
          message: Annotated[str, typer.Option(help="what was seen")] = "",
          maintenance_at: Annotated[float | None, typer.Option(
              help="announce maintenance at this time (Unix seconds): the host's plane policies evacuate it")] = None,
          resolved: Annotated[bool, typer.Option(
              "--resolved", help="the host is sound again: the balancer may place VMs on it")] = False,
          ) -> None:
    """report a fault on HOST (host.HOST.event): critical evacuates it where the level acts on faults"""
    try:
        event = HostFaultEvent(id=new_id(), host=host, kind=kind, severity=severity,  # type: ignore[arg-type]
                               at=time.time(), source="client/cli", message=message,
                               detail={**({} if maintenance_at is None else {"maintenance_at": maintenance_at}),
                                       **({"resolved": True} if resolved else {})})
    except ValueError as exc:
        raise typer.BadParameter(str(exc).splitlines()[-1]) from None

    async def go() -> int:
        async with runtime.connect() as client:
            await client.endpoint.send(host_event(host), event)
        print(f"fault {event.id} reported on {host}: {kind} {severity}")
        return 0

    _go(go())
