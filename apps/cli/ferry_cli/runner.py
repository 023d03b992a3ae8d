"""Long-running processes: ``ferry up`` and ``ferry service`` against RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import Any

from ferry_common.bus.amqp import AmqpBus
from ferry_common.health import HealthServer
from ferry_common.settings import Settings
from ferry_coordinator.autonomic import AutonomicOptions
from ferry_coordinator.balance import BalanceRules
from ferry_coordinator.store import open_store
from ferry_coordinator.timeouts import SagaTimeouts

from . import wiring
from .cluster import (
    HOST_SERVICES,
    LEDGER_MAX,
    HostOptions,
    build_coordinator,
    build_service,
    open_states,
)

log = logging.getLogger(__name__)


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def saga_timeouts(settings: Settings) -> SagaTimeouts:
    """The saga's timeouts, with the overrides tests and drills set: ``FERRY_SAGA_LEASE_S`` (a
    replica's hold on a saga, so how soon a crashed coordinator's sagas are resumed),
    ``FERRY_SAGA_REPLY_S`` (the wait for each answer), ``FERRY_SAGA_STATUS_POLL_S`` and
    ``FERRY_PROGRESS_INTERVAL_S`` (a migration's progress statuses at most once per this)."""
    overrides = {key: value for key, value in (
        ("lease_s", settings.saga_lease_s), ("reply_s", settings.saga_reply_s),
        ("status_poll_s", settings.saga_status_poll_s), ("progress_interval_s", settings.progress_interval_s),
    ) if value is not None}
    return SagaTimeouts(**overrides)  # type: ignore[arg-type]


def autonomic_options(settings: Settings) -> AutonomicOptions:
    """The balancer's level (``FERRY_AUTOMATION_LEVEL``; changed at run time with ``ferry
    automation set``) and interval (``FERRY_BALANCE_INTERVAL_S``)."""
    rules = BalanceRules(interval_s=settings.balance_interval_s or BalanceRules.interval_s)
    return AutonomicOptions(rules=rules, level=settings.automation_level)


def host_labels(raw: str) -> dict[str, str]:
    """``"zone=a,disk=ssd"`` as a dict; a pair without ``=`` is an error, not ignored."""
    out: dict[str, str] = {}
    for pair in (p.strip() for p in raw.split(",")):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"FERRY_HOST_LABELS: {pair!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def _options(settings: Settings, host: str) -> HostOptions:
    driver_options: dict[str, Any] = {}
    if settings.driver == "sim" and settings.state_dir:
        os.makedirs(os.path.join(settings.state_dir, host), exist_ok=True)
        driver_options["state_file"] = os.path.join(settings.state_dir, host, "sim-hypervisor.json")
    if settings.driver == "qemu" and settings.qemu_standby:
        # receiving QEMU processes kept ready per VM shape, e.g. "512:2=2,2048:4"
        driver_options["standby"] = settings.qemu_standby
    if settings.driver == "qemu" and settings.qemu_tls_dir:
        # the migration stream over mutual TLS: the fleet's CA and this host's certificate
        driver_options["tls_dir"] = settings.qemu_tls_dir
    if settings.driver == "libvirt" and settings.libvirt_migrate_tls:
        # VIR_MIGRATE_TLS: the daemons' own certificates (migrate_tls_x509_cert_dir)
        driver_options["tls"] = True
    if settings.driver in ("qemu", "libvirt") and settings.guest_image:
        driver_options["guest_image"] = settings.guest_image
    if settings.driver in ("qemu", "libvirt") and settings.guest_dir:
        driver_options["guest_dir"] = settings.guest_dir
    if settings.driver in ("qemu", "libvirt") and settings.capacity_mib is not None:
        driver_options["capacity_mib"] = settings.capacity_mib
    return HostOptions(
        driver=settings.driver,
        driver_options=driver_options,
        allowed_sources=settings.allowed_sources,
        capacity_mib=settings.capacity_mib,
        # how often the adapter announces its VMs, which is also its heartbeat: the coordinator
        # marks a host not ready after 3 missed periods (FERRY_INVENTORY_INTERVAL_S)
        inventory_interval_s=settings.inventory_interval_s,
        labels=host_labels(settings.host_labels),
        # how many dispatched event ids each VM's audit trail keeps here
        ledger_max=settings.ledger_max or LEDGER_MAX,
    )


async def run_service(settings: Settings, name: str, host: str | None) -> int:
    """One service (or ``host``: the four of one host) until SIGTERM."""
    host = host or settings.host
    names = HOST_SERVICES if name == "host" else (name,)
    return await _run(settings, [(n, host) for n in names if n != "coordinator"], coordinator=name == "coordinator")


async def run_up(settings: Settings, hosts: list[str], *, coordinator: bool = True) -> int:
    """A coordinator and every host service of ``hosts`` in this process (development)."""
    return await _run(settings, [(n, h) for h in hosts for n in HOST_SERVICES], coordinator=coordinator)


async def _run(settings: Settings, services: list[tuple[str, str]], *, coordinator: bool) -> int:
    wiring.gc(settings)
    auth = wiring.auth_factory(settings)
    process = "ferry-" + ("coordinator" if coordinator else services[0][1])
    # before any service starts, so their first spans are recorded: OTLP as OTEL_* says, and
    # migration spans shipped to the coordinator (ferry trace) unless FERRY_TRACE_COLLECT=0
    tracing = wiring.tracing(settings, process)
    bus = wiring.bus(settings, process)
    await bus.connect()
    started: list[Any] = []
    # every service's state store: closed on the way out (an open aiosqlite connection's
    # worker thread would keep the process alive after SIGTERM)
    opened: list[Any] = []
    health = HealthServer(settings.health_port)
    health.add_check("amqp", lambda: _bus_ok(bus))
    store = None
    try:
        await health.start()
        if coordinator:
            store_url = settings.store_url.get_secret_value()
            store = await open_store(store_url)
            c = build_coordinator(bus, store, auth=auth, timeouts=saga_timeouts(settings),
                                  autonomic=autonomic_options(settings))
            await c.start()
            started.append(c)
            print(f"coordinator up (store {store_url.split('@')[-1]})", flush=True)
        for name, host in services:
            states = await open_states(settings.state_dir, host, (name,))
            opened.extend(states.values())
            s = build_service(name, host, bus, options=_options(settings, host), auth=auth, state=states.get(name))
            await s.start()
            started.append(s)
            print(f"{name} up on {host}", flush=True)
        if tracing.bus_exporter is not None and started:
            tracing.bus_exporter.attach(started[0].endpoint)  # any of this process's endpoints will do
        health.set_ready(True)
        await _wait_for_signal()
    finally:
        health.set_ready(False)
        if tracing.bus_exporter is not None:
            with contextlib.suppress(Exception):
                await tracing.bus_exporter.detach()  # the last spans, while the bus is up
        if tracing.provider is not None:
            tracing.provider.shutdown()  # flushes the OTLP batch
        for s in reversed(started):
            with contextlib.suppress(Exception):
                await s.stop()
        await bus.close()
        for state in opened:
            with contextlib.suppress(Exception):
                await state.close()
        if store is not None:
            await store.close()
        await health.close()
    return 0


async def _bus_ok(bus: AmqpBus) -> bool | str:
    conn = bus._conn
    if conn is None or conn.is_closed:
        return "not connected to RabbitMQ"
    return True
