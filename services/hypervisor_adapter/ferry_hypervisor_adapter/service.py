"""The hypervisor-adapter service: the saga's hands on the hypervisor.

A live migration takes seconds to minutes, longer than any handler may hold a
delivery: ``PerformMigration`` is answered at once and the migration runs in a task
that publishes ``migration.progress`` and, at the end, ``VmMigrationFinished`` to the
saga's notify key. A replayed ``PerformMigration`` never starts a second migration:
it answers with how the first one stands, so a coordinator that lost the
notification (or restarted) learns the outcome by asking again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from ferry_common.aio import cancel_and_wait
from ferry_common.bus.topology import host_load, inventory, migration_status
from ferry_common.endpoint import Context, Endpoint
from ferry_common.errors import Conflict, FerryError, InvalidMessage
from ferry_common.messages.base import Wire
from ferry_common.messages.commands import (
    CleanupSource,
    CleanupTarget,
    CreateVm,
    DestroyVm,
    Done,
    FinishIncoming,
    IncomingPrepared,
    Inspect,
    Inspection,
    MigrationStarted,
    PerformMigration,
    PrepareIncoming,
    SourceTeardown,
    VmMigrationFinished,
)
from ferry_common.messages.public import HostInventory, MigrationStatusEvent
from ferry_common.sampler import LatestSender
from ferry_common.service import HostService
from ferry_common.state import StateStore
from ferry_common.telemetry import tracer

from .adoption import AdoptionCommands
from .drivers import Driver, MigrationParams, MigrationProgress, MigrationResult

log = logging.getLogger(__name__)
ADOPTED_KEPT = 256  # adopted incoming guests remembered for a late CleanupTarget


@dataclass
class Outgoing:
    migration_id: str
    vm_id: str
    target_host: str
    notify: str | None
    task: asyncio.Task[None] | None = None
    result: VmMigrationFinished | None = None
    progress: list[dict[str, Any]] = field(default_factory=list)
    postcopy_started: bool = False  # saved: after it the migration is never cancelled or resumed


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
        self.outgoing: dict[str, Outgoing] = {}
        self.incoming: dict[str, str] = {}  # migration id -> vm id
        # incoming guests adopted by FinishIncoming whose migration may still roll back (the
        # saga did not see the answer): CleanupTarget must destroy them too
        self.adopted: dict[str, str] = {}
        self._inventory_task: asyncio.Task[None] | None = None
        self._announcing: asyncio.Task[None] | None = None
        self._announce_again = False
        r = self.router
        r.add(CreateVm, self.on_create)
        r.add(DestroyVm, self.on_destroy)
        r.add(Inspect, self.on_inspect)
        r.add(PerformMigration, self.on_perform)  # idempotent by its own record
        self.step(PrepareIncoming, self.on_prepare)
        r.add(FinishIncoming, self.on_finish_incoming)
        self.step(SourceTeardown, self.on_teardown)
        self.step(CleanupTarget, self.on_cleanup_target)
        self.step(CleanupSource, self.on_cleanup_source)
        self.add_adoption_routes()

    async def restore(self) -> None:
        self.incoming = dict(await self.state.items("incoming"))
        self.adopted = dict(await self.state.items("adopted"))
        for mid, raw in await self.state.items("outgoing"):
            out = Outgoing(mid, raw["vm_id"], raw["target_host"], raw.get("notify"),
                           postcopy_started=bool(raw.get("postcopy_started")))
            if raw.get("result"):
                out.result = VmMigrationFinished.model_validate(raw["result"])
            else:
                # the migration's follower died with us: make sure the hypervisor stops too,
                # and answer the saga's next PerformMigration with what became of it
                if await self.driver.state(out.vm_id) == "postmigrate":
                    out.result = VmMigrationFinished(migration_id=mid, vm_id=out.vm_id, outcome="completed")
                else:
                    await self.driver.cancel_migration(out.vm_id)
                    out.result = VmMigrationFinished(
                        migration_id=mid, vm_id=out.vm_id, outcome="failed",
                        reason="the hypervisor adapter restarted during the migration",
                        postcopy_started=out.postcopy_started,
                    )
                await self._save_outgoing(out)
            self.outgoing[mid] = out

    async def _save_outgoing(self, out: Outgoing) -> None:
        await self.state.put("outgoing", out.migration_id, {
            "vm_id": out.vm_id,
            "target_host": out.target_host,
            "notify": out.notify,
            "result": out.result.model_dump(mode="json") if out.result else None,
            "postcopy_started": out.postcopy_started,
        })

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
        inv = HostInventory(
            host=self.host,
            vms=await self.driver.list(),
            capacity_mib=int(getattr(self.driver, "capacity_mib", 0) or 0),
            driver=self.driver.name,
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

    # ---- step 5, target side ----------------------------------------------------------
    async def on_prepare(self, msg: PrepareIncoming, ctx: Context) -> Wire:
        params = MigrationParams.from_dict(dict(msg.params))
        try:
            if msg.ready_only:
                uri = await self.driver.take_ready_incoming(msg.vm)
            else:
                uri = await self.driver.prepare_incoming(msg.vm, params)
        except Exception as exc:
            raise FerryError(f"cannot prepare incoming vm {msg.vm_id!r}: {exc}", code="incoming_failed") from exc
        if uri is None:
            return IncomingPrepared(uri="", source_resumable=self.source_resumable)
        self.incoming[msg.migration_id] = msg.vm_id
        await self.state.put("incoming", msg.migration_id, msg.vm_id)
        return IncomingPrepared(uri=uri, source_resumable=self.source_resumable)

    async def on_finish_incoming(self, msg: FinishIncoming, ctx: Context) -> Done:
        if not await self.driver.finish_incoming(msg.vm_id):
            raise FerryError(f"vm {msg.vm_id!r} does not run on {self.host!r} after migration", code="not_running")
        self.adopted[msg.migration_id] = msg.vm_id
        await self.state.put("adopted", msg.migration_id, msg.vm_id)
        while len(self.adopted) > ADOPTED_KEPT:
            oldest = next(iter(self.adopted))
            del self.adopted[oldest]
            await self.state.delete("adopted", oldest)
        self.incoming.pop(msg.migration_id, None)
        await self.state.delete("incoming", msg.migration_id)
        self.announce()
        return Done()

    async def on_cleanup_target(self, msg: CleanupTarget, ctx: Context) -> Done:
        adopted = msg.migration_id in self.adopted
        ours = adopted or msg.migration_id in self.incoming
        if ours or await self.driver.state(msg.vm_id) == "inmigrate":
            if not self.source_resumable and await self.driver.state(msg.vm_id) == "running":
                # the hypervisor completed and ended the source (libvirt peer-to-peer): this is
                # the only copy left. The saga goes forward in that case; never destroy it here
                log.warning("cleanup of %s: vm %s runs here and its source is gone; kept",
                            msg.migration_id, msg.vm_id)
                return Done(detail={"kept": "running"})
            await self.driver.abort_incoming(msg.vm_id)
            if ours and await self.driver.state(msg.vm_id) != "absent":
                # the hypervisor finished just as the saga rolled back: whether FinishIncoming
                # adopted this copy or not, the saga never saw it confirmed and the source
                # resumes its paused original, so this one must go (never both running)
                await self.driver.destroy(msg.vm_id)
            if self.adopted.pop(msg.migration_id, None) is not None:
                await self.state.delete("adopted", msg.migration_id)
                await self.publish_inventory()
            self.incoming.pop(msg.migration_id, None)
            await self.state.delete("incoming", msg.migration_id)
        return Done()

    # ---- step 5, source side ----------------------------------------------------------
    async def on_perform(self, msg: PerformMigration, ctx: Context) -> Wire:
        out = self.outgoing.get(msg.migration_id)
        if out is not None:
            if msg.notify and msg.notify != out.notify:
                out.notify = msg.notify
                await self._save_outgoing(out)
            return MigrationStarted(already=True, finished=out.result, source_resumable=self.source_resumable,
                                    postcopy_started=out.postcopy_started)
        # no state check here: every driver's migrate refuses a guest that is not running
        # (a failed result, rolled back like any other), and asking the hypervisor first
        # would put one more round trip to it between the permit and the copy
        params = MigrationParams.from_dict(dict(msg.params))  # bad values refused before anything is recorded
        out = Outgoing(msg.migration_id, msg.vm_id, msg.target_host, msg.notify)
        self.outgoing[msg.migration_id] = out
        await self._save_outgoing(out)
        if out.result is not None:  # its clean-up came meanwhile: it never starts
            return MigrationStarted(already=True, finished=out.result, source_resumable=self.source_resumable)
        out.task = asyncio.create_task(self._migrate(out, msg.uri, params))
        return MigrationStarted(source_resumable=self.source_resumable)

    async def _migrate(self, out: Outgoing, uri: str, params: MigrationParams) -> None:
        # the task inherited the PerformMigration handler's context: this span, and the
        # progress and finish messages sent under it, stay in the migration's trace
        attrs = {"ferry.migration_id": out.migration_id, "ferry.vm_id": out.vm_id, "ferry.source_host": self.host,
                 "ferry.target_host": out.target_host, "ferry.service": self.endpoint.identity}
        with tracer.start_as_current_span(f"hypervisor migrate {out.vm_id}", attributes=attrs) as span:
            await self._run_migration(out, uri, params)
            if out.result is not None:
                span.set_attribute("ferry.outcome", out.result.outcome)
                if out.result.outcome != "completed":
                    span.set_status(Status(StatusCode.ERROR, out.result.reason or out.result.outcome))

    async def _run_migration(self, out: Outgoing, uri: str, params: MigrationParams) -> None:
        # the driver's watch hands its samples over and goes on: a slow broker neither delays
        # its polls and timeouts nor the notice that the migration ended
        progress: LatestSender[MigrationStatusEvent] = LatestSender(self._publish_progress)

        async def on_progress(p: MigrationProgress) -> None:
            out.progress.append(p.to_dict())
            trace.get_current_span().add_event("progress", p.to_dict())
            if p.postcopy and not out.postcopy_started:
                out.postcopy_started = True
                trace.get_current_span().add_event("postcopy_started", {"rung": p.rung})
                await self._save_outgoing(out)  # before the saga can ask: never cancelled from here on
            event = MigrationStatusEvent(
                migration_id=out.migration_id,
                vm_id=out.vm_id,
                status="progress",
                step="migrate_vm",
                source_host=self.host,
                target_host=out.target_host,
                detail=p.to_dict(),
                at=self.endpoint.clock.now(),
            )
            progress.offer(event)

        try:
            result = await self.driver.migrate(out.vm_id, uri, params, on_progress)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("migration %s failed in the driver", out.migration_id)
            result = MigrationResult("failed", f"driver error: {exc}")
        out.result = VmMigrationFinished(
            migration_id=out.migration_id,
            vm_id=out.vm_id,
            outcome=result.outcome,
            reason=result.reason,
            stats=result.stats,
            postcopy_started=result.postcopy_started or out.postcopy_started,
        )
        await self._save_outgoing(out)
        if out.notify:
            try:
                await self.endpoint.send(out.notify, out.result)
            except FerryError as exc:
                # the saga asks again with PerformMigration and gets the result then
                log.info("finish of %s not delivered: %s", out.migration_id, exc.reason)
        await progress.flush()

    async def _publish_progress(self, event: MigrationStatusEvent) -> None:
        with contextlib.suppress(FerryError):
            await self.endpoint.send(migration_status("progress"), event, mandatory=False)

    async def on_cleanup_source(self, msg: CleanupSource, ctx: Context) -> Done:
        out = self.outgoing.get(msg.migration_id)
        if out is None or (out.task is None and out.result is None):
            # the saga gave up before the migration started here (this host was down): its
            # PerformMigration, still queued behind this clean-up, must find it over
            out = out or Outgoing(msg.migration_id, msg.vm_id, "", None)
            out.result = VmMigrationFinished(migration_id=msg.migration_id, vm_id=msg.vm_id, outcome="failed",
                                             reason="rolled back before the migration started")
            self.outgoing[msg.migration_id] = out
            await self._save_outgoing(out)
        if out is not None and out.postcopy_started:
            # the guest's memory is split between the hosts, the newest on the target: nothing
            # here may be cancelled or resumed (a resumed source would run stale memory)
            state = await self.driver.state(msg.vm_id)
            return Done(detail={"source_state": state, "postcopy_started": True})
        await self.driver.cancel_migration(msg.vm_id)
        if out is not None and out.task is not None and not out.task.done():
            # the driver ends a cancelled migration within a poll interval; don't wait forever
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(out.task), 30)
        state = await self.driver.state(msg.vm_id)
        if state == "postmigrate":
            # the hypervisor finished just as the saga gave up: the guest resumes here and
            # the target's copy is torn down by the target's own clean-up
            await self.driver.cancel_migration(msg.vm_id)
            state = await self.driver.state(msg.vm_id)
        return Done(detail={"source_state": state})

    async def on_teardown(self, msg: SourceTeardown, ctx: Context) -> Done:
        await self.driver.confirm_source(msg.vm_id)
        self.outgoing.pop(msg.migration_id, None)
        await self.state.delete("outgoing", msg.migration_id)
        self.announce()
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
