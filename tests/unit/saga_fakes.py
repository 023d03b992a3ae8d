"""A saga without a bus: a scripted command port, an instant clock, the in-memory store."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from ferry_common.clock import SystemClock
from ferry_common.messages.base import Wire
from ferry_common.messages.commands import (
    Done,
    EventsFrozen,
    HostService,
    IncomingPrepared,
    ManagementEventStateSuccess,
    ManagementStateSuccess,
    MigrationCompleteAck,
    MigrationPermitted,
    MigrationStarted,
    MigrationStateSuccess,
    Step,
    VmMigrationFinished,
)
from ferry_common.messages.domain import VmSpec
from ferry_common.messages.public import MigrationStatusEvent
from ferry_coordinator.saga import MigrationSaga, SagaContext
from ferry_coordinator.saga.port import check_reply, service_of
from ferry_coordinator.saga.state import SagaState
from ferry_coordinator.store import MemorySagaStore, SagaRecord
from ferry_coordinator.timeouts import SagaTimeouts

SOURCE, TARGET, MID, VM = "host-a", "host-b", "m-1", "vm-1"
Answer = Callable[[Step], Wire]


def finished(outcome: str = "completed") -> VmMigrationFinished:
    return VmMigrationFinished(migration_id=MID, vm_id=VM, outcome=outcome, stats={"downtime_ms": 1})  # type: ignore[arg-type]


DEFAULTS: dict[str, Answer] = {
    "StartMigration": lambda c: MigrationPermitted(reservation_id=MID),
    "ExportManagementState": lambda c: ManagementStateSuccess(element_ids=[VM, f"{VM}.disk"]),
    "PrepareIncoming": lambda c: IncomingPrepared(uri=f"sim://{TARGET}"),
    "PerformMigration": lambda c: MigrationStarted(finished=finished()),
    "FreezeEvents": lambda c: EventsFrozen(queued=3),
    "SendEventState": lambda c: ManagementEventStateSuccess(staged=3),
    "ExportDirtyObjects": lambda c: MigrationStateSuccess(applied=1),
    "MigrationComplete": lambda c: MigrationCompleteAck(dispatched=3),
}


@dataclass
class FakePort:
    """Answers each command as scripted (by type name, or ``Type@service``), else by default;
    a scripted entry may be a list, answered in turn (the last one repeats). Records each call."""

    script: dict[str, Answer | list[Answer]] = field(default_factory=dict)
    calls: list[tuple[str, str, str]] = field(default_factory=list)  # (host, service, command)

    async def call(self, host: str, command: Step, *, timeout_s: float,
                   service: HostService | None = None, answered_by: str = "") -> Wire:
        svc = service_of(command, service)
        name = type(command).__name__
        self.calls.append((host, svc, name))
        await asyncio.sleep(0)
        entry = self.script.get(f"{name}@{svc}", self.script.get(name))
        if isinstance(entry, list):
            entry = entry.pop(0) if len(entry) > 1 else entry[0]
        answer = (entry or DEFAULTS.get(name, lambda c: Done()))(command)
        return check_reply(command, answer, f"{svc} on {host}")

    def sent(self, name: str, service: str | None = None) -> list[tuple[str, str, str]]:
        return [c for c in self.calls if c[2] == name and (service is None or c[1] == service)]


def raises(exc: Exception) -> Answer:
    def answer(command: Step) -> Wire:
        raise exc
    return answer


class InstantClock(SystemClock):
    """Real time, but a sleep only yields (and is remembered)."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        await asyncio.sleep(0)


@dataclass
class Harness:
    port: FakePort
    store: MemorySagaStore
    clock: InstantClock
    statuses: list[MigrationStatusEvent]
    cancels: dict[str, str]

    async def run(self, *, target_ready: bool = False, timeouts: SagaTimeouts | None = None) -> SagaRecord:
        now = self.clock.now()
        state = SagaState(vm=VmSpec(vm_id=VM, memory_mib=256), epoch=0, target_ready=target_ready)
        record, created = await self.store.create(SagaRecord(
            migration_id=MID, vm_id=VM, source_host=SOURCE, target_host=TARGET, created_at=now, updated_at=now,
            owner="coordinator-1", lease_until=now + 60, data=state.dump()))
        assert created

        async def publish(event: MigrationStatusEvent) -> None:
            self.statuses.append(event)

        async def no_notification(mid: str, timeout: float) -> VmMigrationFinished | None:
            await asyncio.sleep(0)
            return None

        async def finished_(rec: SagaRecord) -> None:
            return None

        ctx = SagaContext(
            port=self.port, clock=self.clock, identity="coordinator", publish=publish, store=self.store,
            timeouts=timeouts or SagaTimeouts(progress_interval_s=0.0), owner="coordinator-1",
            notify_key="saga.notify.coordinator-1", wait_notification=no_notification,
            cancel_reason=self.cancels.get, on_finished=finished_, on_owner=lambda vm, host, epoch: None)
        return await asyncio.wait_for(MigrationSaga(ctx, record).run(), 10)

    def events(self, rec: SagaRecord, step: str | None = None) -> list[tuple[str, str]]:
        return [(h.step, h.event) for h in rec.history if step is None or h.step == step]


def harness(script: dict[str, Answer | list[Answer]] | None = None) -> Harness:
    return Harness(FakePort(dict(script or {})), MemorySagaStore(), InstantClock(), [], {})
