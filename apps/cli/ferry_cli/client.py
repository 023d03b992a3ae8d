"""What a person (or a test) does with Ferry over the bus: migrate, cancel, look, feed events."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, get_args

from ferry_common.bus.interfaces import QueueSpec
from ferry_common.bus.topology import (
    COORDINATOR_QUERY,
    HOST_SERVICES,
    MIGRATION_CANCEL,
    MIGRATION_REQUESTED,
    MIGRATION_STATUSES,
    host_command,
    migration_status,
    vm_events,
)
from ferry_common.endpoint import Context, Endpoint, Router
from ferry_common.errors import FerryError, RemoteError
from ferry_common.ids import new_id
from ferry_common.messages.commands import (
    ActivateVmEvents,
    AdoptVm,
    CreateVm,
    GetLimits,
    GetTrace,
    HostList,
    Inspect,
    Inspection,
    LimitsInfo,
    ListHosts,
    ListMigrations,
    MigrationList,
    RegisterManagementGraph,
    ReleaseVm,
    SetAttributes,
    StorageMode,
    TraceSpans,
    VmAdopted,
)
from ferry_common.messages.domain import Event, ManagementGraph, Module, VmSpec
from ferry_common.messages.public import (
    OUTCOMES,
    MigrateRequest,
    MigrationCancel,
    MigrationStatusEvent,
    Status,
    VmEvent,
    VmEventBatch,
    is_outcome,
)

# the statuses that always end a migration; OUTCOMES adds `failed`, which ends one only with a
# forward-failure code (see is_outcome) and is what a client waiting for outcomes alone watches
TERMINAL = ("completed", "rolled_back", "rejected")
STATUSES = get_args(Status)


class FerryClient:
    def __init__(self, endpoint: Endpoint, *, timeout: float = 10.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._watching = False
        self._followers: list[asyncio.Queue[MigrationStatusEvent]] = []
        self._history: list[MigrationStatusEvent] = []

    async def watch(self, statuses: Sequence[str] = STATUSES) -> None:
        """Start receiving ``migration.<status>`` events (call before migrating to miss
        nothing): every status by default, or only ``statuses`` (``OUTCOMES`` for a client
        that waits for outcomes and shows no progress: the broker routes it less)."""
        if self._watching:
            return
        self._watching = True
        router = Router()
        router.route_key(MIGRATION_STATUSES, MigrationStatusEvent)

        async def on_status(msg: MigrationStatusEvent, ctx: Context) -> None:
            self._history.append(msg)
            for q in self._followers:  # every follower sees every event
                q.put_nowait(msg)

        router.add(MigrationStatusEvent, on_status)
        keys = tuple(migration_status(s) for s in statuses)
        spec = QueueSpec(f"watch.{self.endpoint.instance}", keys, durable=False, prefetch=1024)
        await self.endpoint.serve(spec, router)

    async def migrate(self, vm_id: str, target_host: str | None = None, *, migration_id: str | None = None,
                      params: dict[str, Any] | None = None) -> str:
        """Ask for ``vm_id`` to move to ``target_host`` (placement picks one if None)."""
        mid = migration_id or new_id()
        req = MigrateRequest(vm_id=vm_id, target_host=target_host, migration_id=mid, params=params or {})
        await self.endpoint.send(MIGRATION_REQUESTED, req)
        return mid

    async def cancel(self, migration_id: str, reason: str = "cancelled by operator") -> None:
        await self.endpoint.send(MIGRATION_CANCEL, MigrationCancel(migration_id=migration_id, reason=reason))

    async def follow(self, migration_id: str, *, timeout: float = 600.0,
                     poll_s: float = 2.0) -> AsyncIterator[MigrationStatusEvent]:
        """Yield this migration's events until its outcome (requires :meth:`watch`).

        Status events are not guaranteed (one published while the broker was down, or just
        before the coordinator died, is gone); the saga record is. So after ``poll_s``
        without an event the record is asked for, and an outcome found there ends it."""
        assert self._watching, "call watch() first"
        queue: asyncio.Queue[MigrationStatusEvent] = asyncio.Queue()
        # registered and snapshotted together: the queue gets exactly what comes after
        self._followers.append(queue)
        past = [e for e in self._history if e.migration_id == migration_id]
        try:
            for event in past:
                yield event
                if is_outcome(event.status, event.code):
                    return
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    raise TimeoutError(f"migration {migration_id} did not end within {timeout:g}s")
                try:
                    event = await asyncio.wait_for(queue.get(), min(left, poll_s))
                except TimeoutError:
                    ended = await self._recorded_outcome(migration_id)
                    if ended is None:
                        continue
                    event = ended
                if event.migration_id != migration_id:
                    continue
                yield event
                if is_outcome(event.status, event.code):
                    return
        finally:
            self._followers.remove(queue)

    async def _recorded_outcome(self, migration_id: str) -> MigrationStatusEvent | None:
        """The outcome as the saga record has it, as a status event; None while it runs (or
        while no coordinator answers)."""
        try:
            rec = await self.migration(migration_id)
        except (FerryError, AssertionError):
            return None
        if rec is None or rec.get("status") not in OUTCOMES:  # a record is `failed` only at its end
            return None
        data = rec.get("data") or {}
        return MigrationStatusEvent(
            migration_id=migration_id, vm_id=rec["vm_id"], status=rec["status"], step=rec.get("step") or None,
            source_host=rec.get("source_host") or None, target_host=rec.get("target_host") or None,
            reason=str(data["reason"])[:4000] if data.get("reason") else None, code=data.get("code") or None,
            at=float(rec.get("updated_at") or 0.0),
            detail={"from": "record"},
        )

    async def outcome(self, migration_id: str, *, timeout: float = 600.0) -> MigrationStatusEvent:
        last = None
        async for event in self.follow(migration_id, timeout=timeout):
            last = event
        assert last is not None
        return last

    async def create_vm(self, host: str, spec: VmSpec, graph: ManagementGraph, modules: list[Module]) -> None:
        """Start the guest, register its management plane, and let its events flow."""
        await self.endpoint.request(host_command(host, "hypervisor_adapter"), CreateVm(vm=spec), timeout=self.timeout)
        await self.endpoint.request(
            host_command(host, "managed_object"), RegisterManagementGraph(graph=graph, modules=modules), timeout=self.timeout
        )
        await self.endpoint.request(host_command(host, "sensor"), ActivateVmEvents(vm_id=spec.vm_id), timeout=self.timeout)

    async def adopt_vm(self, host: str, domain: str, plane: Callable[[str], ManagementGraph], modules: list[Module],
                       *, storage: StorageMode = "shared") -> VmSpec:
        """Take a guest ``host``'s hypervisor already runs (a defined domain, by name or UUID)
        under management with the plane ``plane(vm_id)``; if the plane is refused the guest is
        given back, so nothing is left half-adopted."""
        ans = await self.endpoint.request(host_command(host, "hypervisor_adapter"), AdoptVm(domain=domain, storage=storage),
                                          timeout=self.timeout)
        assert isinstance(ans, VmAdopted)
        vm_id = ans.vm.vm_id
        try:
            await self.endpoint.request(host_command(host, "managed_object"),
                                        RegisterManagementGraph(graph=plane(vm_id), modules=modules), timeout=self.timeout)
        except RemoteError as exc:
            if not (ans.already and exc.code == "conflict"):  # adopted before, with its plane: kept
                await self._undo_adopt(host, vm_id, ans.already)
                raise
        except Exception:
            await self._undo_adopt(host, vm_id, ans.already)
            raise
        await self.endpoint.request(host_command(host, "sensor"), ActivateVmEvents(vm_id=vm_id), timeout=self.timeout)
        return ans.vm

    async def _undo_adopt(self, host: str, vm_id: str, already: bool) -> None:
        if not already:
            await self.endpoint.request(host_command(host, "hypervisor_adapter"), ReleaseVm(vm_id=vm_id),
                                        timeout=self.timeout)

    async def release_vm(self, host: str, vm_id: str) -> None:
        """Give an adopted guest back: its events, plane and management end on ``host``; the
        guest runs on, still defined. Refused while it migrates. The adapter goes first: it
        refuses a guest it cannot give back (not adopted, migrating) before anything changed."""
        for service in ("hypervisor_adapter", "sensor", "managed_object"):
            await self.endpoint.request(host_command(host, service), ReleaseVm(vm_id=vm_id), timeout=self.timeout)

    async def send_event(self, event: VmEvent) -> None:
        await self.endpoint.send(vm_events(event.vm_id), event)

    async def send_batch(self, vm_id: str, events: Sequence[Event]) -> None:
        """Send events of ``vm_id`` as one :class:`VmEventBatch` message."""
        await self.endpoint.send(vm_events(vm_id), VmEventBatch(vm_id=vm_id, events=list(events)))

    async def set_attributes(self, host: str, vm_id: str, element_id: str, attributes: dict[str, Any]) -> None:
        await self.endpoint.request(
            host_command(host, "managed_object"),
            SetAttributes(vm_id=vm_id, element_id=element_id, attributes=attributes),
            timeout=self.timeout,
        )

    async def inspect(self, host: str, vm_id: str | None = None) -> dict[str, dict[str, Any]]:
        """Each service's view of ``vm_id`` (or of everything) on ``host``."""
        out: dict[str, dict[str, Any]] = {}
        for service in HOST_SERVICES:
            ans = await self.endpoint.request(host_command(host, service), Inspect(vm_id=vm_id), timeout=self.timeout)
            assert isinstance(ans, Inspection)
            out[service] = dict(ans.data)
        return out

    async def placement(self) -> dict[str, list[str]]:
        ans = await self.endpoint.request(COORDINATOR_QUERY, Inspect(), timeout=self.timeout)
        assert isinstance(ans, Inspection)
        placement = ans.data.get("placement", {})
        assert isinstance(placement, dict)
        return {str(k): list(v) for k, v in placement.items()}

    async def migration(self, migration_id: str) -> dict[str, Any] | None:
        """One saga record, or None if the coordinator has none by that id."""
        ans = await self.endpoint.request(COORDINATOR_QUERY, ListMigrations(migration_id=migration_id), timeout=self.timeout)
        assert isinstance(ans, MigrationList)
        return dict(ans.migrations[0]) if ans.migrations else None

    async def migrations(self, vm_id: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        ans = await self.endpoint.request(COORDINATOR_QUERY, ListMigrations(vm_id=vm_id, limit=limit), timeout=self.timeout)
        assert isinstance(ans, MigrationList)
        return [dict(m) for m in ans.migrations]

    async def hosts(self) -> list[dict[str, Any]]:
        """Each host as the coordinator's placement sees it (``ferry hosts``)."""
        ans = await self.endpoint.request(COORDINATOR_QUERY, ListHosts(), timeout=self.timeout)
        assert isinstance(ans, HostList)
        return [dict(h) for h in ans.hosts]

    async def limits(self, *, cluster: int | None = None, outbound: int | None = None,
                     inbound: int | None = None) -> dict[str, Any]:
        """The migration limits in force, changed first where a value is given (``ferry limits``)."""
        msg = GetLimits(cluster=cluster, outbound_per_host=outbound, inbound_per_host=inbound)
        ans = await self.endpoint.request(COORDINATOR_QUERY, msg, timeout=self.timeout)
        assert isinstance(ans, LimitsInfo)
        return {**ans.limits, "in_flight": ans.in_flight, "queued": ans.queued}

    async def trace(self, migration_id: str) -> list[dict[str, Any]]:
        ans = await self.endpoint.request(COORDINATOR_QUERY, GetTrace(migration_id=migration_id), timeout=self.timeout)
        assert isinstance(ans, TraceSpans)
        return [dict(s) for s in ans.spans]

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.endpoint.close()
