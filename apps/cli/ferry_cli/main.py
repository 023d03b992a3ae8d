"""The ``ferry`` command: the one entry point for people, and each service's (``ferry service``).

Settings are read once a run (:mod:`ferry_cli.runtime`) and handed to what the command
builds. Listing commands print tables for people and take ``--json`` for scripts. The
command groups are modules of their own (``*_cli.py``); this one runs Ferry itself.
"""

import logging
import sys
from typing import Annotated

import typer

from ferry_common.bus.topology import HOST_SERVICES
from ferry_common.settings import SettingsError

from . import autonomic_cli, migrations_cli, runtime, views, vms_cli
from .hosts_cli import host_app
from .keys_cli import keys_app
from .planes_cli import plane_app
from .runtime import Json, settings

SERVICES = (*HOST_SERVICES, "coordinator", "host")

app = typer.Typer(
    name="ferry", help="Move running VMs with their management plane.", no_args_is_help=True,
    add_completion=False, pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(vms_cli.vm_app, name="vm")
app.add_typer(keys_app, name="keys")
app.add_typer(plane_app, name="plane")
app.add_typer(host_app, name="host")


def main(argv: list[str] | None = None) -> int:
    """Run ``ferry`` with ``argv`` (default: the process's) and return its exit code."""
    runtime.reset_settings()  # read once per run, from the environment as it is now
    try:
        app(args=argv, prog_name="ferry")  # exits: commands end with typer.Exit(code)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except SettingsError as bad:
        print(f"ferry: {bad}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


@app.callback()
def _root(verbose: Annotated[bool, typer.Option("-v", "--verbose", help="debug logging")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# ---- running Ferry -------------------------------------------------------------------------
@app.command()
def demo(rate: Annotated[float, typer.Option(help="events per second")] = 400.0) -> None:
    """run the demo on the embedded in-process bus"""
    from .demo import run_demo

    runtime.run(run_demo(rate=rate, settings=settings()))


@app.command()
def up(hosts: Annotated[str, typer.Option(help="comma-separated host names")] = "host-a,host-b",
       no_coordinator: Annotated[bool, typer.Option("--no-coordinator")] = False) -> None:
    """run a coordinator and the host services against RabbitMQ"""
    from .runner import run_up

    names = [h for h in hosts.split(",") if h]
    runtime.run(run_up(settings(), names, coordinator=not no_coordinator))


@app.command()
def service(name: Annotated[str, typer.Argument(help=" | ".join(SERVICES))],
            host: Annotated[str | None, typer.Option(help="host name (default FERRY_HOST)")] = None) -> None:
    """run one service (sensor, managed_object, migration_policy, hypervisor_adapter, coordinator, or host for the four of one host)"""
    from .runner import run_service

    if name not in SERVICES:
        raise typer.BadParameter(f"{name!r} is not one of {', '.join(SERVICES)}", param_hint="NAME")
    runtime.run(run_service(settings(), name, host))


@app.command()
def config(as_json: Json = False) -> None:
    """print the effective settings (secrets masked)"""
    rows = settings().rows()
    if as_json:
        runtime.print_json({r["variable"]: r["value"] for r in rows})
    else:
        views.config_table(runtime.console(), rows)


# the other top-level commands, in the order `ferry --help` lists them
migrations_cli.register(app)
vms_cli.register(app)


@app.command()
def health(url: Annotated[str | None, typer.Option(help="default: this process's FERRY_HEALTH_PORT /readyz")] = None) -> None:
    """exit 0 if the service at URL is ready"""
    from ferry_common.health import probe

    async def go() -> int:
        ok, text = await probe(url=url or f"http://127.0.0.1:{settings().health_port}/readyz", timeout_s=3.0)
        print(text)
        return 0 if ok else 1

    runtime.run(go())


autonomic_cli.register(app)


if __name__ == "__main__":
    sys.exit(main())
