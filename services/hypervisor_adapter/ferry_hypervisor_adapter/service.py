"""The hypervisor-adapter service: the saga's hands on the hypervisor.

It creates and destroys guests, announces the host's inventory (also its heartbeat) and
load, and wires the migration's steps: the source's (``migration_source``: the migration
runs in a task, answered at once) and the target's (``migration_target``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from ferry_common.aio import cancel_and_wait
from ferry_common.bus.topology import host_load, inventory
from ferry_common.endpoint import Context, Endpoint
from ferry_common.errors import Conflict, FerryError, InvalidMessage
from ferry_common.messages.commands import (
    CleanupSource,
    CleanupTarget,
    CreateVm,
    DestroyVm,
    Done,
    FinishIncoming,
    Inspect,
    Inspection,
    PerformMigration,
    PrepareIncoming,
    SourceTeardown,
)
from ferry_common.messages.public import HostInventory
from ferry_common.service import HostService
from ferry_common.state import StateStore

from .adoption import AdoptionCommands
from .drivers import Driver
from .migration_source import MigrationSource, Outgoing
from .migration_target import MigrationTarget

log = logging.getLogger(__name__)


class HypervisorAdapterService(AdoptionCommands, HostService):
    service = "hypervisor_adapter"

    def __init__(
        self,
        host: str,
        endpoint: Endpoint,
        driver: Driver,
        state: StateStore | None = None,
        *,
        inventory_interval_s: float = 5.0,
        labels: dict[str, str] | None = None,
    ) -> None:
        super().__init__(host, endpoint, state)
        self.driver = driver
        # the inventory is also this host's heartbeat: the coordinator marks the host not
        # ready after a few periods without one (ferry_coordinator.fleet.liveness)
        self.inventory_interval_s = inventory_interval_s
        self.labels = dict(labels or {})
        self.outgoing: dict[str, Outgoing] = {}  # migration id -> this source's record
        self.incoming: dict[str, str] = {}  # migration id -> vm id, prepared here as the target
        self._inventory_task: asyncio.Task[None] | None = None
        self._announcing: asyncio.Task[None] | None = None
        self._announce_again = False
        r = self.router
        r.add(CreateVm, self.on_create)
        r.add(DestroyVm, self.on_destroy)
        r.add(Inspect, self.on_inspect)
        # the migration's steps, as its source and as its target
        self.source = source = MigrationSource(self)
        self.target = target = MigrationTarget(self)
        r.add(PerformMigration, source.on_perform)  # idempotent by its own record
        self.step(SourceTeardown, source.on_teardown)
        self.step(CleanupSource, source.on_cleanup_source)
        self.step(PrepareIncoming, target.on_prepare)
        r.add(FinishIncoming, target.on_finish_incoming)
        self.step(CleanupTarget, target.on_cleanup_target)
        self.add_adoption_routes()

    async def restore(self) -> None:
        await self.target.restore()
        await self.source.restore()

    async def start(self) -> None:
        await self.driver.start()
        await super().start()
        self._inventory_task = asyncio.create_task(self._inventory_loop())

    async def stop(self) -> None:
        await cancel_and_wait(self._announcing, self._inventory_task)
        for o in self.outgoing.values():
            if o.task is not None and not o.task.done():
                o.task.cancel()
        await super().stop()
        await self.driver.close()

    async def publish_inventory(self) -> None:
        # a VM runs on this host's driver whatever its spec was created with: placement
        # matches it to hosts of the same driver
        name = self.driver.name
        vms = [vm if vm.driver == name else vm.model_copy(update={"driver": name}) for vm in await self.driver.list()]
        inv = HostInventory(
            host=self.host,
            vms=vms,
            capacity_mib=int(getattr(self.driver, "capacity_mib", 0) or 0),
            driver=name,
            ready_incoming=list(self.driver.ready_shapes()),
            adoptable=await self.adoptable(),
            labels=self.labels,
            period_s=self.inventory_interval_s,
        )
        with contextlib.suppress(FerryError):  # nobody listening yet is fine
            await self.endpoint.send(inventory(self.host), inv)

    def announce(self) -> None:
        """Publish the inventory beside the answer in hand rather than before it: it is an
        announcement (where a migrating VM is, the saga's record says); one goes out at a
        time, and again if something changed meanwhile."""
        self._announce_again = True
        if self._announcing is None or self._announcing.done():
            self._announcing = asyncio.create_task(self._announce())

    async def _announce(self) -> None:
        while self._announce_again:
            self._announce_again = False
            try:
                await self.publish_inventory()
            except Exception:
                log.exception("inventory of %s not published", self.host)

    async def publish_load(self) -> None:
        """The host's load and its guests' (``host.<host>.load``), for the balancer."""
        sample = getattr(self.driver, "telemetry", None)
        if sample is None:
            return
        load = (await sample()).model_copy(update={"period_s": self.inventory_interval_s})
        with contextlib.suppress(FerryError):  # nobody listening yet is fine
            await self.endpoint.send(host_load(self.host), load, mandatory=False)

    async def _inventory_loop(self) -> None:
        """Every period the host says it lives: its inventory, or, while collecting one takes
        longer (a hypervisor busy with a migration answers late), a heartbeat alone, so the
        coordinator does not take a busy host for a dead one."""
        collecting: asyncio.Task[None] | None = None
        try:
            while True:
                if collecting is None or collecting.done():
                    collecting = asyncio.create_task(self._collect())
                period = asyncio.ensure_future(self.endpoint.clock.sleep(self.inventory_interval_s))
                await asyncio.wait({collecting, period}, return_when=asyncio.FIRST_COMPLETED)
                if not collecting.done():
                    beat = HostInventory(host=self.host, capacity_mib=0, driver=self.driver.name,
                                         period_s=self.inventory_interval_s, heartbeat=True)
                    with contextlib.suppress(FerryError):
                        await self.endpoint.send(inventory(self.host), beat, mandatory=False)
                await period  # one inventory or heartbeat a period
        finally:
            await cancel_and_wait(collecting)

    async def _collect(self) -> None:
        try:
            await self.publish_inventory()
            await self.publish_load()
        except Exception:
            log.exception("inventory of %s not published", self.host)

    # ---- administration -----------------------------------------------------------
    @property
    def source_resumable(self) -> bool:
        """Whether the driver can resume a source after the hypervisor completed (see Driver)."""
        return bool(getattr(self.driver, "can_resume_source_after_completion", True))

    async def on_create(self, msg: CreateVm, ctx: Context) -> Done:
        if await self.driver.state(msg.vm.vm_id) != "absent":
            if ctx.redelivered and any(v == msg.vm for v in await self.driver.list()):
                return Done(detail={"existing": True})  # created, then the answer was lost
            raise Conflict(f"vm {msg.vm.vm_id!r} already exists on {self.host!r}")
        try:
            await self.driver.create(msg.vm)
        except FerryError:
            raise
        except Exception as exc:
            raise InvalidMessage(f"cannot create vm {msg.vm.vm_id!r}: {exc}") from exc
        await self.publish_inventory()
        return Done()

    async def on_destroy(self, msg: DestroyVm, ctx: Context) -> Done:
        await self.driver.destroy(msg.vm_id)
        await self.publish_inventory()
        return Done()

    # ---- inspection -------------------------------------------------------------------
    async def on_inspect(self, msg: Inspect, ctx: Context) -> Inspection:
        vms = {v.vm_id: await self.driver.state(v.vm_id) for v in await self.driver.list()}
        if msg.vm_id is not None:
            vms = {msg.vm_id: await self.driver.state(msg.vm_id)}
        data: dict[str, Any] = {
            "vms": vms,
            "incoming": dict(self.incoming),
            "outgoing": {k: (v.result.outcome if v.result else "running") for k, v in self.outgoing.items()},
        }
        return Inspection(host=self.host, service=self.service, data=data)
