"""Assemble Ferry's services on a bus: one host's four services, or the coordinator."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ferry_common.bus.interfaces import Bus
from ferry_common.bus.topology import HOST_SERVICES
from ferry_common.clock import Clock, SystemClock
from ferry_common.endpoint import Endpoint
from ferry_common.security import Authenticator, host_identity
from ferry_common.service import HostService
from ferry_common.state import SqliteStateStore, StateStore
from ferry_coordinator.autonomic import AutonomicOptions
from ferry_coordinator.service import CoordinatorService
from ferry_coordinator.store import SagaStore
from ferry_coordinator.timeouts import SagaTimeouts
from ferry_hypervisor_adapter.drivers import Driver, load_driver
from ferry_hypervisor_adapter.service import HypervisorAdapterService
from ferry_managed_object.service import LEDGER_MAX, ManagedObjectService
from ferry_migration_policy.service import MigrationPolicyService
from ferry_sensor.service import SensorService

AuthFactory = Callable[[str], Authenticator | None]


def _no_auth(identity: str) -> Authenticator | None:
    return None


@dataclass
class HostOptions:
    driver: str = "sim"
    driver_options: dict[str, Any] = field(default_factory=dict)
    allowed_sources: tuple[str, ...] = ("*",)
    capacity_mib: int | None = None
    inventory_interval_s: float = 5.0
    ledger_max: int = LEDGER_MAX
    labels: dict[str, str] = field(default_factory=dict)  # placement's host selectors match these


@dataclass
class Host:
    """The management plane of one host: its four services, each with its own endpoint."""

    name: str
    services: dict[str, HostService]

    @property
    def sensor(self) -> SensorService:
        return self.services["sensor"]  # type: ignore[return-value]

    @property
    def managed_object(self) -> ManagedObjectService:
        return self.services["managed_object"]  # type: ignore[return-value]

    @property
    def migration_policy(self) -> MigrationPolicyService:
        return self.services["migration_policy"]  # type: ignore[return-value]

    @property
    def adapter(self) -> HypervisorAdapterService:
        return self.services["hypervisor_adapter"]  # type: ignore[return-value]

    async def start(self, only: tuple[str, ...] = HOST_SERVICES) -> None:
        for name in only:
            await self.services[name].start()

    async def stop(self, only: tuple[str, ...] = HOST_SERVICES) -> None:
        for name in reversed(only):
            await self.services[name].stop()
        for name in only:
            await self.services[name].endpoint.close()


def build_service(
    name: str,
    host: str,
    bus: Bus,
    *,
    clock: Clock | None = None,
    options: HostOptions | None = None,
    auth: AuthFactory = _no_auth,
    driver: Driver | None = None,
    state: StateStore | None = None,
) -> HostService:
    """One host service, unstarted; ``state`` is where it keeps what survives a restart."""
    clock = clock or SystemClock()
    options = options or HostOptions()
    identity = host_identity(host, name)
    endpoint = Endpoint(bus, identity, clock=clock, auth=auth(identity))
    if name == "sensor":
        return SensorService(host, endpoint, state)
    if name == "managed_object":
        return ManagedObjectService(host, endpoint, state, ledger_max=options.ledger_max)
    if name == "migration_policy":
        return MigrationPolicyService(
            host, endpoint, state, allowed_sources=options.allowed_sources, capacity_mib=options.capacity_mib
        )
    if name == "hypervisor_adapter":
        if driver is None:
            opts = dict(options.driver_options)
            if options.driver == "sim":
                opts.setdefault("clock", clock)
            driver = load_driver(options.driver, host, **opts)
        return HypervisorAdapterService(
            host, endpoint, driver, state, inventory_interval_s=options.inventory_interval_s, labels=options.labels
        )
    raise ValueError(f"unknown service {name!r} ({', '.join(HOST_SERVICES)})")


def build_host(
    name: str,
    bus: Bus,
    *,
    clock: Clock | None = None,
    options: HostOptions | None = None,
    auth: AuthFactory = _no_auth,
    driver: Driver | None = None,
    states: dict[str, StateStore] | None = None,
) -> Host:
    services: dict[str, HostService] = {
        s: build_service(
            s, name, bus, clock=clock, options=options, auth=auth, driver=driver, state=(states or {}).get(s)
        )
        for s in HOST_SERVICES
    }
    return Host(name, services)


async def open_states(
    state_dir: str | None, host: str, only: tuple[str, ...] = HOST_SERVICES
) -> dict[str, StateStore]:
    """One SQLite state file per service under ``state_dir/host`` (in memory without a dir)."""
    if not state_dir:
        return {}
    os.makedirs(os.path.join(state_dir, host), exist_ok=True)
    return {s: await SqliteStateStore.open(os.path.join(state_dir, host, f"{s}.db")) for s in only}


def build_coordinator(
    bus: Bus,
    store: SagaStore,
    *,
    clock: Clock | None = None,
    timeouts: SagaTimeouts | None = None,
    auth: AuthFactory = _no_auth,
    autonomic: AutonomicOptions | None = None,
) -> CoordinatorService:
    endpoint = Endpoint(bus, "coordinator", clock=clock, auth=auth("coordinator"))
    return CoordinatorService(endpoint, store, timeouts=timeouts, autonomic=autonomic)
