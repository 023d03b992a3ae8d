"""``ferry keys init|generate``: the fleet's message-signing keys (docs/security.md)."""

from __future__ import annotations

from typing import Annotated

import typer

keys_app = typer.Typer(help="message-signing keys", no_args_is_help=True)


@keys_app.command("init")
def keys_init(directory: str,
              host: Annotated[list[str] | None, typer.Option("--host", help="a host's key, repeatable")] = None,
              client: Annotated[list[str] | None, typer.Option("--client", help="a client's key, repeatable")] = None,
              ) -> None:
    """create the fleet's keys, trust.json and permissions.json in DIRECTORY"""
    from ferry_common.signing.cli import run_init

    raise typer.Exit(run_init(directory, host or [], client or []))


@keys_app.command("generate")
def keys_generate(names: Annotated[list[str], typer.Argument(help="one key pair per name")],
                  directory: Annotated[str, typer.Option("--dir", help="where NAME.key and NAME.pub go")]) -> None:
    """write NAME.key and NAME.pub into DIR"""
    from ferry_common.signing.cli import run_generate

    raise typer.Exit(run_generate(directory, names))
