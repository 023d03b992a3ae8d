"""What every ``ferry`` command uses: the settings, a client on the bus, running the
command's coroutine for its exit code, and printing.

Settings are read once a run (:func:`ferry_common.settings.load_settings`), on first use: a
command that needs none, like ``ferry keys``, runs even with a bad variable set. Commands
look :func:`connect` up here when they run, so tests put a fake client in its place.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from ferry_common.settings import Settings, load_settings

if TYPE_CHECKING:
    from .client import FerryClient

Json = Annotated[bool, typer.Option("--json", help="print JSON for scripts instead of a table")]
Params = Annotated[list[str] | None, typer.Option("--param", help="KEY=VALUE (JSON values parsed), repeatable")]

_SETTINGS: list[Settings] = []


def settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    if not _SETTINGS:
        _SETTINGS.append(load_settings())
    return _SETTINGS[0]


def reset_settings() -> None:
    """Read the settings again on next use (once per run, from the environment as it is then)."""
    _SETTINGS.clear()


def run(coro: Coroutine[Any, Any, int | None]) -> None:
    """Run a command's coroutine; its result is the exit code."""
    try:
        exit_with(int(asyncio.run(coro) or 0))
    except KeyboardInterrupt:
        exit_with(130)


def exit_with(code: int) -> None:
    if code:
        raise typer.Exit(code)


def console() -> Console:
    return Console(highlight=False)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def parse_params(pairs: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as a dict, each value parsed as JSON where it is JSON."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, _, raw = pair.partition("=")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def show(fetch: Callable[[FerryClient], Awaitable[Any]], table: Callable[[Console, Any], None],
         as_json: bool) -> None:
    """A listing command: what ``fetch`` asks for, as JSON for scripts or as a table."""

    async def go() -> int:
        async with connect() as client:
            data = await fetch(client)
        if as_json:
            print_json(data)
        else:
            table(console(), data)
        return 0

    run(go())


def act(work: Callable[[FerryClient], Awaitable[object]], done: str) -> None:
    """A command that asks one thing of the fleet, then says ``done``."""

    async def go() -> int:
        async with connect() as client:
            await work(client)
        print(done)
        return 0

    run(go())


class connect:  # lower case: it reads as a call, ``async with connect() as client``
    """``async with connect() as c``: a FerryClient on RabbitMQ, closed afterwards."""

    async def __aenter__(self) -> Any:
        from ferry_common.endpoint import Endpoint

        from . import wiring
        from .client import FerryClient

        s = settings()
        self.bus = wiring.bus(s, "ferry-cli")
        await self.bus.connect()
        identity = s.identity or "client/cli"
        self.client = FerryClient(Endpoint(self.bus, identity, auth=wiring.authenticator(s)))
        return self.client

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()
        await self.bus.close()
