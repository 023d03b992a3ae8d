"""The ``ferry`` command: the one entry point for people, and each service's (``ferry service``).

Settings are read once here (:func:`ferry_common.settings.load_settings`) and handed to what
the command builds. Listing commands print tables for people and take ``--json`` for scripts.
"""

import asyncio
import json
import logging
import sys
import time
from collections.abc import Coroutine
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.console import Console

from ferry_common.bus.topology import HOST_SERVICES
from ferry_common.settings import Settings, SettingsError, load_settings

from . import views

SERVICES = (*HOST_SERVICES, "coordinator", "host")

app = typer.Typer(
    name="ferry", help="Move running VMs with their management plane.", no_args_is_help=True,
    add_completion=False, pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]},
)
vm_app = typer.Typer(help="create a VM with its management graph, or show one", no_args_is_help=True)
keys_app = typer.Typer(help="message-signing keys", no_args_is_help=True)
app.add_typer(vm_app, name="vm")
app.add_typer(keys_app, name="keys")
from .hosts_cli import host_app  # noqa: E402 - after the app it joins
from .planes_cli import plane_app  # noqa: E402

app.add_typer(plane_app, name="plane")

app.add_typer(host_app, name="host")

Json = Annotated[bool, typer.Option("--json", help="print JSON for scripts instead of a table")]
Params = Annotated[list[str] | None, typer.Option("--param", help="KEY=VALUE (JSON values parsed), repeatable")]


def main(argv: list[str] | None = None) -> int:
    """Run ``ferry`` with ``argv`` (default: the process's) and return its exit code."""
    _SETTINGS.clear()  # read once per run, from the environment as it is now
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


_SETTINGS: list[Settings] = []


def settings() -> Settings:
    """The process's settings, read from the environment on first use (a command that needs
    none, like ``ferry keys``, runs even with a bad variable set)."""
    if not _SETTINGS:
        _SETTINGS.append(load_settings())
    return _SETTINGS[0]


def _run(coro: Coroutine[Any, Any, int | None]) -> None:
    try:
        _exit(int(asyncio.run(coro) or 0))
    except KeyboardInterrupt:
        _exit(130)


def _exit(code: int) -> None:
    if code:
        raise typer.Exit(code)


def _console() -> Console:
    return Console(highlight=False)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


# ---- running Ferry -------------------------------------------------------------------------
@app.command()
def demo(rate: Annotated[float, typer.Option(help="events per second")] = 400.0) -> None:
    """run the demo on the embedded in-process bus"""
    from .demo import run_demo

    _run(run_demo(rate=rate, settings=settings()))


@app.command()
def up(hosts: Annotated[str, typer.Option(help="comma-separated host names")] = "host-a,host-b",
       no_coordinator: Annotated[bool, typer.Option("--no-coordinator")] = False) -> None:
    """run a coordinator and the host services against RabbitMQ"""
    from .runner import run_up

    names = [h for h in hosts.split(",") if h]
    _run(run_up(settings(), names, coordinator=not no_coordinator))


@app.command()
def service(name: Annotated[str, typer.Argument(help=" | ".join(SERVICES))],
            host: Annotated[str | None, typer.Option(help="host name (default FERRY_HOST)")] = None) -> None:
    """run one service (sensor, managed_object, migration_policy, hypervisor_adapter, coordinator, or host for the four of one host)"""
    from .runner import run_service

    if name not in SERVICES:
        raise typer.BadParameter(f"{name!r} is not one of {', '.join(SERVICES)}", param_hint="NAME")
    _run(run_service(settings(), name, host))


@app.command()
def config(as_json: Json = False) -> None:
    """print the effective settings (secrets masked)"""
    rows = settings().rows()
    if as_json:
        _print_json({r["variable"]: r["value"] for r in rows})
    else:
        views.config_table(_console(), rows)


# ---- migrations ----------------------------------------------------------------------------
@app.command()
def migrate(vm: str, target: Annotated[str | None, typer.Option("--to", help="target host (default: placement picks)")] = None,
            migration_id: Annotated[str | None, typer.Option("--id")] = None, param: Params = None,
            no_wait: Annotated[bool, typer.Option("--no-wait")] = False,
            timeout: Annotated[float, typer.Option()] = 3600.0) -> None:
    """publish a MigrateRequest and follow it (a live progress bar on a terminal)"""

    async def go() -> int:
        async with _client() as client:
            await client.watch()
            mid = await client.migrate(vm, target, migration_id=migration_id, params=_params(param))
            print(f"migration {mid}: {vm} -> {target or '(placement picks)'}", flush=True)
            if no_wait:
                return 0
            last = None
            with views.MigrateProgress(_console()) as shown:
                async for e in client.follow(mid, timeout=timeout):
                    last = e
                    shown.update(e)
            return 0 if last is not None and last.status == "completed" else 1

    _run(go())


@app.command()
def cancel(migration_id: str, reason: Annotated[str, typer.Option()] = "cancelled by operator") -> None:
    """cancel a migration (a queued one never starts; a running one rolls back)"""

    async def go() -> int:
        async with _client() as client:
            await client.cancel(migration_id, reason)
        print(f"cancel requested for {migration_id}")
        return 0

    _run(go())


@app.command()
def migrations(vm: Annotated[str | None, typer.Option()] = None, limit: Annotated[int, typer.Option()] = 20,
               brief: Annotated[bool, typer.Option("--brief", help="without each step's history")] = False,
               as_json: Json = False) -> None:
    """list migrations with their step history"""

    async def go() -> int:
        async with _client() as client:
            rows = await client.migrations(vm, limit)
        if as_json:
            _print_json(rows)
        else:
            views.migrations_table(_console(), rows, history=not brief)
        return 0

    _run(go())


@app.command()
def hosts(as_json: Json = False) -> None:
    """list hosts: capacity, use, reservations, migrations in flight, labels, state"""

    async def go() -> int:
        async with _client() as client:
            rows = await client.hosts()
        if as_json:
            _print_json(rows)
        else:
            views.hosts_table(_console(), rows)
        return 0

    _run(go())


@app.command()
def limits(cluster: Annotated[int | None, typer.Option(min=1, help="migrations in flight cluster-wide")] = None,
           outbound: Annotated[int | None, typer.Option(min=1, help="outbound per host")] = None,
           inbound: Annotated[int | None, typer.Option(min=1, help="inbound per host")] = None,
           as_json: Json = False) -> None:
    """show the migration limits, or change them at run time (every coordinator replica)"""

    async def go() -> int:
        async with _client() as client:
            info = await client.limits(cluster=cluster, outbound=outbound, inbound=inbound)
        if as_json:
            _print_json(info)
        else:
            views.limits_table(_console(), info)
        return 0

    _run(go())


@app.command()
def trace(migration_id: str, as_json: Json = False) -> None:
    """show the trace of one migration as a tree"""
    from .render import render_trace

    async def go() -> int:
        async with _client() as client:
            spans = await client.trace(migration_id)
        if as_json:
            _print_json(spans)
            return 0 if spans else 1
        if not spans:
            print(f"no spans recorded for {migration_id}")
            return 1
        print(render_trace(spans))
        return 0

    _run(go())


# ---- VMs and their events ------------------------------------------------------------------
@vm_app.command("create")
def vm_create(vm: str, host: Annotated[str, typer.Option("--on", help="host to create it on")],
              memory: Annotated[int, typer.Option(help="MiB")] = 1024,
              param: Annotated[list[str] | None, typer.Option("--param", help="driver parameter KEY=VALUE")] = None,
              elements: Annotated[int, typer.Option(help="extra managed elements")] = 0) -> None:
    """create a VM with a sample management graph"""
    from ferry_testing.sample import MODULES, graph, vm_spec

    async def go() -> int:
        async with _client() as client:
            spec = vm_spec(vm, memory_mib=memory, **_params(param))
            await client.create_vm(host, spec, graph(vm, extra_elements=elements), MODULES)
        print(f"created {vm} on {host}")
        return 0

    _run(go())


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
        async with _client() as client:
            spec = await client.adopt_vm(host, domain, plane_for, modules, storage=storage.value)
        print(f"adopted {spec.vm_id} on {host} (storage {spec.params.get('storage')}, "
              f"{len(spec.params.get('disks') or [])} disks)")
        return 0

    _run(go())


@vm_app.command("release")
def vm_release(vm: str, host: Annotated[str, typer.Option("--on", help="the VM's host")]) -> None:
    """stop managing an adopted guest (it runs on, still defined)"""

    async def go() -> int:
        async with _client() as client:
            await client.release_vm(host, vm)
        print(f"released {vm} on {host}: it runs on, no longer managed")
        return 0

    _run(go())


@vm_app.command("show")
def vm_show(vm: str, as_json: Json = False) -> None:
    """where a VM and its management plane are, and their state"""

    async def go() -> int:
        async with _client() as client:
            placement = await client.placement()
            seen = {h: await client.inspect(h, vm) for h in sorted(placement)}
        view = views.vm_view(vm, placement, seen)
        if as_json:
            _print_json(view)
        else:
            views.vm_table(_console(), view)
        return 0

    _run(go())


@app.command()
def events(vm: str, count: Annotated[int, typer.Option()] = 10,
           rate: Annotated[float, typer.Option(help="per second (0: as fast as possible)")] = 0.0,
           batch: Annotated[int, typer.Option(help="events per message (VmEventBatch, at most 1000)")] = 1) -> None:
    """send service-plane events to a VM"""
    from ferry_common.messages.public import MAX_BATCH, VmEvent
    from ferry_testing.sample import event

    if not 1 <= batch <= MAX_BATCH:
        print(f"--batch must be between 1 and {MAX_BATCH}", file=sys.stderr)
        _exit(2)

    async def go() -> int:
        async with _client() as client:
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

    _run(go())


# ---- operations ----------------------------------------------------------------------------
@app.command()
def health(url: Annotated[str | None, typer.Option(help="default: this process's FERRY_HEALTH_PORT /readyz")] = None) -> None:
    """exit 0 if the service at URL is ready"""
    from ferry_common.health import probe

    async def go() -> int:
        ok, text = await probe(url=url or f"http://127.0.0.1:{settings().health_port}/readyz", timeout_s=3.0)
        print(text)
        return 0 if ok else 1

    _run(go())


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


# ---- helpers -------------------------------------------------------------------------------
def _params(pairs: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, _, raw = pair.partition("=")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


class _client:
    """``async with _client() as c``: a FerryClient on RabbitMQ, closed afterwards."""

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


from .autonomic_cli import register as _register_autonomic  # noqa: E402 - it uses _client above

_register_autonomic(app)


if __name__ == "__main__":
    sys.exit(main())
