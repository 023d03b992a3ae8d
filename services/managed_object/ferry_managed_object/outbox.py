"""The durable outbox: what a VM's policies asked to send, kept until it is out.

A dispatch writes the messages its effects ask for together with the embots' state (one
write before the ack); they are sent after it, oldest first, and each leaves the outbox once
sent or refused for good. A passing fault stops the sending and is raised, so the delivery
comes again and the rest goes then; a crash leaves them to be sent at the next start.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ferry_common.bus.topology import MIGRATION_REQUESTED, alarm, vm_events
from ferry_common.endpoint import Endpoint
from ferry_common.errors import FerryError
from ferry_common.ids import new_id
from ferry_common.messages.base import Wire
from ferry_common.messages.public import Alarm, MigrateRequest, VmEvent
from ferry_common.messages.recommendations import EvacuationWanted, MigrationWanted
from ferry_common.state import StateStore

from .autonomic import wanted
from .plane import VmPlane
from .policy import Effect

log = logging.getLogger(__name__)
_OUTGOING: dict[str, type[Wire]] = {
    m.__name__: m for m in (Alarm, VmEvent, MigrateRequest, MigrationWanted, EvacuationWanted)}

Row = tuple[str, dict[str, Any]]  # (its key in the state store, the message as stored)


class Outbox:
    """Per VM, what its policies asked to send that is not out yet, oldest first."""

    def __init__(self, host: str, endpoint: Endpoint, state: StateStore) -> None:
        self.host = host
        self.endpoint = endpoint
        self.state = state
        self.pending: dict[str, list[Row]] = {}
        # one sender per VM's outbox: two dispatches handled at once would send its head twice
        self._locks: dict[str, asyncio.Lock] = {}

    def get(self, vm_id: str) -> list[Row] | None:
        return self.pending.get(vm_id)

    async def restore(self, vm_id: str) -> None:
        if rows := await self.state.items(f"outbox.{vm_id}"):
            self.pending[vm_id] = rows

    def add(self, plane: VmPlane, seq: int, effects: list[tuple[str, str, str, Effect]]) -> list[Row]:
        """Queue the messages ``effects`` ask for, keyed after the ledger's ``seq``; the rows
        are for the caller to write with the dispatch."""
        rows = [(f"{seq:012d}.{j:04d}", row) for j, row in enumerate(self._outgoing(plane, effects))]
        self.pending.setdefault(plane.vm_id, []).extend(rows)
        return rows

    def _outgoing(self, plane: VmPlane, effects: list[tuple[str, str, str, Effect]]) -> list[dict[str, Any]]:
        """The messages ``effects`` ask for, made once: a resend carries the same ids."""
        out: list[dict[str, Any]] = []
        for element_id, embot_id, policy, effect in effects:
            msg: Wire
            if effect.kind == "alarm":
                detail = effect.value if isinstance(effect.value, dict) else {"value": effect.value}
                msg = Alarm(vm_id=plane.vm_id, element_id=element_id, embot_id=embot_id, policy=policy,
                            host=self.host, name=effect.key or policy, detail=detail)
                key = alarm(plane.vm_id)
            elif effect.kind == "emit":
                data = effect.value if isinstance(effect.value, dict) else {"value": effect.value}
                msg = VmEvent(id=new_id(), vm_id=plane.vm_id, element_id=element_id, kind=effect.key or "emitted",
                              ts=self.endpoint.clock.now(), data=data)
                key = vm_events(plane.vm_id)
            elif (asked := wanted(effect, vm_id=plane.vm_id, host=self.host, policy=policy,
                                  embot_id=embot_id)) is not None:
                key, msg = asked  # the balancer's actions (ferry_managed_object.autonomic)
            elif effect.kind == "migrate" and effect.target_host:
                # a fixed id: the coordinator starts one migration however often this is sent
                msg = MigrateRequest(vm_id=plane.vm_id, target_host=effect.target_host, migration_id=new_id(),
                                     reason=f"policy {policy} of {embot_id}")
                key = MIGRATION_REQUESTED
            else:
                continue
            out.append({"key": key, "type": type(msg).__name__, "body": msg.model_dump(mode="json")})
        return out

    async def send(self, vm_id: str) -> None:
        """Send what ``vm_id``'s policies asked for, oldest first; each entry leaves the outbox
        once sent (or refused for good). A passing fault stops here and is raised, so the
        delivery comes again and the rest goes then."""
        if not self.pending.get(vm_id):
            return
        async with self._locks.setdefault(vm_id, asyncio.Lock()):
            await self._send_pending(vm_id)

    async def _send_pending(self, vm_id: str) -> None:
        pending = self.pending.get(vm_id)
        while pending:
            key, row = pending[0]
            model = _OUTGOING[row["type"]]
            try:
                await self.endpoint.send(row["key"], model.model_validate(row["body"]))
            except FerryError as exc:
                if exc.retryable:
                    raise
                # nobody listens for this alarm or event: the state change still stands
                log.info("%s of %s not delivered: %s", row["type"], vm_id, exc.reason)
            await self.state.delete(f"outbox.{vm_id}", key)
            pending.pop(0)

    async def send_all(self) -> None:
        """What a crash left between the write and the sends, at start."""
        for vm_id in list(self.pending):
            try:
                await self.send(vm_id)
            except FerryError as exc:
                log.info("outbox of %s waits for the next dispatch: %s", vm_id, exc.reason)
