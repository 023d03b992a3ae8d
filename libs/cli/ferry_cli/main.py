"""The ``ferry`` command: the one entry point for people."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

from ferry_common.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(asyncio.run(args.func(args)) or 0)
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferry", description="Move running VMs with their management plane.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the demo on the embedded in-process bus")
    demo.add_argument("--rate", type=float, default=400.0, help="events per second")
    demo.set_defaults(func=_demo)

    up = sub.add_parser("up", help="run a coordinator and the host services against RabbitMQ")
    up.add_argument("--hosts", default="host-a,host-b", help="comma-separated host names")
    up.add_argument("--no-coordinator", action="store_true")
    up.set_defaults(func=_up)

    svc = sub.add_parser("service", help="run one service (sensor, managed_object, migration_policy, "
                         "hypervisor_adapter, coordinator, or host for the four of one host)")
    svc.add_argument("name")
    svc.add_argument("--host", default=None, help="host name (default FERRY_HOST)")
    svc.set_defaults(func=_service)

    mig = sub.add_parser("migrate", help="publish a MigrateRequest and follow it")
    mig.add_argument("vm")
    mig.add_argument("--to", required=True, dest="target")
    mig.add_argument("--id", dest="migration_id")
    mig.add_argument("--param", action="append", default=[], help="migration parameter KEY=VALUE")
    mig.add_argument("--no-wait", action="store_true")
    mig.add_argument("--timeout", type=float, default=3600.0)
    mig.set_defaults(func=_migrate)

    cancel = sub.add_parser("cancel", help="cancel a migration (it rolls back)")
    cancel.add_argument("migration_id")
    cancel.add_argument("--reason", default="cancelled by operator")
    cancel.set_defaults(func=_cancel)

    ls = sub.add_parser("migrations", help="list migrations with their step history")
    ls.add_argument("--vm")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_migrations)

    tr = sub.add_parser("trace", help="show the trace of one migration as a tree")
    tr.add_argument("migration_id")
    tr.set_defaults(func=_trace)

    vm = sub.add_parser("vm", help="create a VM with its management graph, or show one")
    vm_sub = vm.add_subparsers(metavar="ACTION")
    create = vm_sub.add_parser("create")
    create.add_argument("vm")
    create.add_argument("--on", required=True, dest="host")
    create.add_argument("--memory", type=int, default=1024, help="MiB")
    create.add_argument("--param", action="append", default=[], help="driver parameter KEY=VALUE")
    create.add_argument("--elements", type=int, default=0, help="extra managed elements")
    create.set_defaults(func=_vm_create)
    show = vm_sub.add_parser("show", help="where a VM and its management plane are, and their state")
    show.add_argument("vm")
    show.set_defaults(func=_vm_show)

    ev = sub.add_parser("events", help="send service-plane events to a VM")
    ev.add_argument("vm")
    ev.add_argument("--count", type=int, default=10)
    ev.add_argument("--rate", type=float, default=0.0, help="per second (0: as fast as possible)")
    ev.add_argument("--batch", type=int, default=1, help="events per message (VmEventBatch, at most 1000)")
    ev.set_defaults(func=_events)

    health = sub.add_parser("health", help="exit 0 if the service at URL is ready")
    health.add_argument("--url", default=None)
    health.set_defaults(func=_health)

    keys = sub.add_parser("keys", help="message-signing keys")
    keys_sub = keys.add_subparsers(metavar="ACTION")
    gen = keys_sub.add_parser("generate", help="write NAME.key and NAME.pub into DIR")
    gen.add_argument("--dir", required=True)
    gen.add_argument("names", nargs="+")
    gen.set_defaults(func=_keys_generate)
    return p


# ---- commands --------------------------------------------------------------------------
async def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return await run_demo(rate=args.rate)


async def _up(args: argparse.Namespace) -> int:
    from .runner import run_up

    hosts = [h for h in args.hosts.split(",") if h]
    return await run_up(Settings(), hosts, coordinator=not args.no_coordinator)


async def _service(args: argparse.Namespace) -> int:
    from .runner import run_service

    return await run_service(Settings(), args.name, args.host)


async def _migrate(args: argparse.Namespace) -> int:
    params = _params(args.param)
    async with _client() as client:
        await client.watch()
        mid = await client.migrate(args.vm, args.target, migration_id=args.migration_id, params=params)
        print(f"migration {mid}: {args.vm} -> {args.target}")
        if args.no_wait:
            return 0
        last = None
        async for e in client.follow(mid, timeout=args.timeout):
            last = e
            print(_status_line(e), flush=True)
        return 0 if last is not None and last.status == "completed" else 1


async def _cancel(args: argparse.Namespace) -> int:
    async with _client() as client:
        await client.cancel(args.migration_id, args.reason)
        print(f"cancel requested for {args.migration_id}")
    return 0


async def _migrations(args: argparse.Namespace) -> int:
    async with _client() as client:
        rows = await client.migrations(args.vm, args.limit)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for r in rows:
        print(f"{r['migration_id']}  {r['vm_id']}  {r['source_host']} -> {r['target_host']}  {r['status']}"
              f"{'  (' + str(r['data'].get('reason')) + ')' if r['data'].get('reason') else ''}")
        for h in r["history"]:
            detail = f"  {h['detail']}" if h["detail"] else ""
            print(f"    {h['at']:.3f}  {h['step']:<16} {h['event']}{detail}")
    return 0


async def _trace(args: argparse.Namespace) -> int:
    from .render import render_trace

    async with _client() as client:
        spans = await client.trace(args.migration_id)
    if not spans:
        print(f"no spans recorded for {args.migration_id}")
        return 1
    print(render_trace(spans))
    return 0


async def _vm_create(args: argparse.Namespace) -> int:
    from .sample import MODULES, graph, vm_spec

    async with _client() as client:
        spec = vm_spec(args.vm, memory_mib=args.memory, **_params(args.param))
        await client.create_vm(args.host, spec, graph(args.vm, extra_elements=args.elements), MODULES)
    print(f"created {args.vm} on {args.host}")
    return 0


async def _vm_show(args: argparse.Namespace) -> int:
    async with _client() as client:
        placement = await client.placement()
        hosts = sorted(placement)
        where = [h for h, vms in placement.items() if args.vm in vms]
        print(f"{args.vm}: runs on {', '.join(where) or 'no known host'}")
        for h in hosts:
            s = await client.inspect(h, args.vm)
            plane = s["managed_object"]["planes"].get(args.vm)
            sensor = s["sensor"]["vms"].get(args.vm)
            vm_state = s["hypervisor_adapter"]["vms"].get(args.vm, "absent")
            if plane is None and sensor is None and vm_state == "absent":
                continue
            print(f"  {h}: vm {vm_state}; management plane {plane['status'] if plane else 'none'}"
                  f"{'; events ' + sensor['mode'] + ' (' + str(sensor['queued']) + ' queued)' if sensor else ''}")
            if plane:
                for embot, state in plane["embots"].items():
                    print(f"    embot {embot}: {json.dumps(state, default=str)}")
    return 0


async def _events(args: argparse.Namespace) -> int:
    import time

    from ferry_common.messages.public import MAX_BATCH, VmEvent

    from .sample import event

    if not 1 <= args.batch <= MAX_BATCH:
        print(f"--batch must be between 1 and {MAX_BATCH}", file=sys.stderr)
        return 2
    async with _client() as client:
        pending: list[VmEvent] = []
        for n in range(args.count):
            ev = event(args.vm, n, time.time())
            pending.append(VmEvent.model_validate(ev.model_dump() | {"id": f"{ev.id}-{time.time_ns()}"}))
            if len(pending) == args.batch or n == args.count - 1:
                if len(pending) == 1 and args.batch == 1:
                    await client.send_event(pending[0])
                else:
                    await client.send_batch(args.vm, pending)
                pending = []
            if args.rate:
                await asyncio.sleep(1.0 / args.rate)
    print(f"sent {args.count} events to {args.vm}")
    return 0


async def _health(args: argparse.Namespace) -> int:
    from ferry_common.health import probe

    url = args.url or f"http://127.0.0.1:{Settings().health_port}/readyz"
    ok, text = await probe(url=url, timeout_s=3.0)
    print(text)
    return 0 if ok else 1


async def _keys_generate(args: argparse.Namespace) -> int:
    from ferry_common.signing import generate_keypair

    for name in args.names:
        generate_keypair(args.dir, name)
        print(f"wrote {args.dir}/{name}.key and {name}.pub")
    return 0


# ---- helpers ---------------------------------------------------------------------------
def _params(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _status_line(e: Any) -> str:
    if e.status == "progress" and e.detail.get("percent") is not None:
        d = e.detail
        ladder = f"  downtime {d['downtime_limit_ms']} ms (rung {d.get('rung', 0)})" if d.get("downtime_limit_ms") else ""
        return (f"  migrate_vm  pass {d.get('passes')}  {d.get('percent')}%  "
                f"{d.get('remaining_bytes', 0) / 2**20:.0f} MiB remaining{ladder}"
                f"{'  post-copy' if d.get('postcopy') else ''}")
    if e.status == "progress":
        return f"  {e.step}"
    return f"{e.status}{': ' + e.reason if e.reason else ''}"


class _client:
    """``async with _client() as c``: a FerryClient on RabbitMQ, closed afterwards."""

    async def __aenter__(self) -> Any:
        from ferry_common.bus.amqp import AmqpBus
        from ferry_common.endpoint import Endpoint
        from ferry_common.signing import authenticator_from_env

        from .client import FerryClient

        settings = Settings()
        self.bus = AmqpBus.from_env(settings.amqp_url, name="ferry-cli")
        await self.bus.connect()
        identity = settings.identity or "client/cli"
        self.client = FerryClient(Endpoint(self.bus, identity, auth=authenticator_from_env()))
        return self.client

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()
        await self.bus.close()


if __name__ == "__main__":
    sys.exit(main())
