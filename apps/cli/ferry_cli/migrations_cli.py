"""``ferry migrate``, ``cancel``, ``migrations``, ``hosts``, ``limits`` and ``trace``: start and
follow migrations, and the coordinator's view of them and of the hosts they move between."""

from __future__ import annotations

from typing import Annotated

import typer

from . import runtime, views
from .runtime import Json, Params


def register(app: typer.Typer) -> None:
    for command in (migrate, cancel, migrations, hosts, limits, trace):
        app.command()(command)


def migrate(vm: str, target: Annotated[str | None, typer.Option("--to", help="target host (default: placement picks)")] = None,
            migration_id: Annotated[str | None, typer.Option("--id")] = None, param: Params = None,
            no_wait: Annotated[bool, typer.Option("--no-wait")] = False,
            timeout: Annotated[float, typer.Option()] = 3600.0) -> None:
    """publish a MigrateRequest and follow it (a live progress bar on a terminal)"""

    async def go() -> int:
        async with runtime.connect() as client:
            await client.watch()
            mid = await client.migrate(vm, target, migration_id=migration_id, params=runtime.parse_params(param))
            print(f"migration {mid}: {vm} -> {target or '(placement picks)'}", flush=True)
            if no_wait:
                return 0
            last = None
            with views.MigrateProgress(runtime.console()) as shown:
                async for e in client.follow(mid, timeout=timeout):
                    last = e
                    shown.update(e)
            return 0 if last is not None and last.status == "completed" else 1

    runtime.run(go())


def cancel(migration_id: str, reason: Annotated[str, typer.Option()] = "cancelled by operator") -> None:
    """cancel a migration (a queued one never starts; a running one rolls back)"""
    runtime.act(lambda client: client.cancel(migration_id, reason), f"cancel requested for {migration_id}")


def migrations(vm: Annotated[str | None, typer.Option()] = None, limit: Annotated[int, typer.Option()] = 20,
               brief: Annotated[bool, typer.Option("--brief", help="without each step's history")] = False,
               as_json: Json = False) -> None:
    """list migrations with their step history"""
    runtime.show(lambda client: client.migrations(vm, limit),
                 lambda console, rows: views.migrations_table(console, rows, history=not brief), as_json)


def hosts(as_json: Json = False) -> None:
    """list hosts: capacity, use, reservations, migrations in flight, labels, state"""
    runtime.show(lambda client: client.hosts(), views.hosts_table, as_json)


def limits(cluster: Annotated[int | None, typer.Option(min=1, help="migrations in flight cluster-wide")] = None,
           outbound: Annotated[int | None, typer.Option(min=1, help="outbound per host")] = None,
           inbound: Annotated[int | None, typer.Option(min=1, help="inbound per host")] = None,
           as_json: Json = False) -> None:
    """show the migration limits, or change them at run time (every coordinator replica)"""
    runtime.show(lambda client: client.limits(cluster=cluster, outbound=outbound, inbound=inbound),
                 views.limits_table, as_json)


def trace(migration_id: str, as_json: Json = False) -> None:
    """show the trace of one migration as a tree"""
    from .render import render_trace

    async def go() -> int:
        async with runtime.connect() as client:
            spans = await client.trace(migration_id)
        if as_json:
            runtime.print_json(spans)
            return 0 if spans else 1
        if not spans:
            print(f"no spans recorded for {migration_id}")
            return 1
        print(render_trace(spans))
        return 0

    runtime.run(go())
