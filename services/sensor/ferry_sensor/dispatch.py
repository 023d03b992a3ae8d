"""The sensor's dispatch: events out to the managed-object service, batched and in order.

Events taken together go out together: they join their VM's pending batch, and one flush
sends each VM's batch as one ``DispatchEvents`` (in chunks of :data:`DISPATCH_BATCH`) while
the previous flush is confirmed. A backlog (a drain) goes a chunk at a time, each once the
managed-object service acted on the one before. Live events that fail to go out are held,
durably, and the VM's live dispatch is suspended until a drain gets them out.

:class:`EventDispatch` is the part of :class:`~ferry_sensor.service.SensorService` that does
this; the service supplies its queues, store and lease hooks.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from ferry_common.bus.topology import host_command
from ferry_common.endpoint import Endpoint
from ferry_common.errors import FerryError, Transient
from ferry_common.ids import new_id
from ferry_common.messages.commands import DispatchEvents
from ferry_common.messages.domain import Event
from ferry_common.state import StateStore

from .queues import VmEvents

log = logging.getLogger("ferry_sensor.service")
DISPATCH_BATCH = 2000


class EventDispatch:
    """Batched, ordered dispatch of a sensor's events (a part of the sensor service)."""

    # the service's own, used here
    host: str
    endpoint: Endpoint
    state: StateStore
    vms: dict[str, VmEvents]
    dispatched: int
    held: int
    drain_chunk_timeout_s: float

    def _init_dispatch(self) -> None:
        # what waits to go out in the next flush, per (VM, drain or live)
        self._batches: dict[tuple[str, bool], Batch] = {}
        self._flush_scheduled = False
        self._send_lock = asyncio.Lock()
        self._drain_sent: dict[str, int] = {}  # vm_id -> events of the running drain sent so far
        self._drains: dict[str, asyncio.Task[None]] = {}  # vm_id -> its backlog going out

    # hooks the service provides
    async def _save(self, vm: VmEvents) -> None:
        raise NotImplementedError

    def _count_queued(self) -> None:
        raise NotImplementedError

    def renew_soon(self) -> None:
        raise NotImplementedError

    async def _drained(self, vm: VmEvents, through: int) -> None:
        """The queue's head up to key ``through`` is out; what came after stays stored."""
        await self._save(vm)
        await self.state.delete_through(queue_ns(vm.vm_id), f"{through:012d}")
        await self.state.clear(drained_ns(vm.vm_id))  # after the queue: none of it is stored now

    async def _drain(self, vm: VmEvents) -> None:
        """Dispatch what ``vm`` holds, in order, ahead of anything arriving meanwhile.

        What does not get out (the connection went, a chunk was not answered) is held again,
        still first; what did get out is not: a resend could come after the managed-object
        service's dedup window has moved past it.
        """
        events, through = vm.merged(), vm.seq
        held, vm.queues, vm.draining = vm.queues, {}, True
        self._drain_sent[vm.vm_id] = 0
        try:
            await self._dispatch(events, drain=True)
        except BaseException:
            sent = {e.id for e in events[: self._drain_sent.get(vm.vm_id, 0)]}
            if sent:
                held = {k: [e for e in q if e.id not in sent] for k, q in held.items()}
                held = {k: q for k, q in held.items() if q}
            for element_id, queued in vm.queues.items():
                held.setdefault(element_id, []).extend(queued)
            vm.queues = held
            raise
        finally:
            vm.draining = False
            self._drain_sent.pop(vm.vm_id, None)
        if not vm.queued:
            vm.suspended = False  # everything held is out: live dispatch may resume
        await self._drained(vm, through)
        self._count_queued()

    async def _dispatch(self, events: list[Event], *, drain: bool = False) -> None:
        """Dispatch in the order of calls, batching what arrives together; returns once sent.

        The events join their VM's pending batch before the first await, so a backlog handed
        over at step 7 goes out ahead of live events that arrive while it is sent. Each VM's
        batch succeeds or fails on its own; while a VM is suspended only drains go out.
        """
        if not events:
            return
        key = (events[0].vm_id, drain)
        batch = self._batches.get(key)
        loop = asyncio.get_running_loop()
        if batch is None:
            batch = self._batches[key] = Batch([], loop.create_future())
            if not self._flush_scheduled:
                self._flush_scheduled = True
                loop.call_soon(lambda: asyncio.ensure_future(self._flush_now()))
        batch.events.extend(events)
        await asyncio.shield(batch.done)

    async def _flush_now(self) -> None:
        async with self._send_lock:  # flushes go out one after another, in order
            # the batches are taken once the previous flush is out: what arrived meanwhile
            # goes in one message per VM, not one confirmed publish per event
            self._flush_scheduled = False
            batches, self._batches = self._batches, {}
            by_vm: dict[str, list[tuple[bool, Batch]]] = {}
            for (vm_id, drain), batch in batches.items():
                by_vm.setdefault(vm_id, []).append((drain, batch))
            try:
                # VMs are independent: their confirms are awaited together, not one after another
                await asyncio.gather(*(self._flush_vm(vm_id, items) for vm_id, items in by_vm.items()))
            except BaseException as exc:
                for b in batches.values():
                    if not b.done.done():
                        b.done.set_exception(exc)
                raise

    async def _flush_vm(self, vm_id: str, items: list[tuple[bool, Batch]]) -> None:
        """Send one VM's batches of this flush in order (a drain ahead of live events)."""
        vm = self.vms.get(vm_id)
        failed = False
        for drain, batch in items:
            try:
                if failed or (not drain and vm is not None and vm.suspended):
                    raise Transient(f"events of {vm_id} are held behind a dispatch that failed")
                await self._send(vm_id, batch.events, drain=drain)
            except Exception as exc:
                failed = True
                if drain or vm is None or self.vms.get(vm_id) is not vm:
                    batch.done.set_exception(exc)  # a drain puts its events back itself
                    continue
                await self._hold_failed(vm, batch, exc)
            else:
                batch.done.set_result(None)

    async def _hold_failed(self, vm: VmEvents, batch: Batch, exc: Exception) -> None:
        """Live events that did not go out (the connection went, or a dispatch ahead of them
        failed) are held, durably, before their deliveries are acknowledged: they go out in
        time order with whatever the broker redelivers, once a drain gets through; the VM's
        live dispatch is suspended until then, so nothing newer overtakes them."""
        vm.suspended = True
        log.info("dispatch of %s failed, %d events are held: %s", vm.vm_id, len(batch.events), exc)
        rows = []
        for event in batch.events:
            vm.requeue(event)
            rows.append((vm.store_key(), event.model_dump(mode="json")))
        try:
            await self.state.put_many(queue_ns(vm.vm_id), rows)
        except Exception as store_exc:
            batch.done.set_exception(store_exc)
            return
        self.held += len(rows)
        self._count_queued()
        batch.done.set_result(None)
        self.renew_soon()

    async def _send(self, vm_id: str, events: list[Event], *, drain: bool = False) -> None:
        key = host_command(self.host, "managed_object")
        vm = self.vms.get(vm_id)
        completed_by, epoch = (vm.completed_by, vm.epoch) if vm is not None else (None, 0)
        for i in range(0, len(events), DISPATCH_BATCH):
            msg = DispatchEvents(vm_id=vm_id, events=events[i : i + DISPATCH_BATCH], completed_by=completed_by,
                                 epoch=epoch)
            if drain:
                # a backlog goes a chunk at a time, each once the managed-object service has
                # acted on the one before: its queue never holds the whole backlog, and what
                # else it is asked (a saga's next step) waits for one chunk, not for all
                await self.endpoint.request(key, msg, timeout=self.drain_chunk_timeout_s)
                self._drain_sent[vm_id] = self._drain_sent.get(vm_id, 0) + len(msg.events)
                # the queue's rows go only when the whole drain is out: until then, what was
                # acted on is recorded, so a restart does not send it again
                await self.state.put(drained_ns(vm_id), new_id(), [e.id for e in msg.events])
            else:
                await self.endpoint.send(key, msg)
            self.dispatched += len(msg.events)

    async def _quiesce(self) -> None:
        """Wait until every dispatch already begun has been published (or has failed, and
        its events are held)."""
        pending = [asyncio.shield(b.done) for b in self._batches.values()]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        async with self._send_lock:
            pass


    def _drain_soon(self, vm: VmEvents) -> None:
        """Dispatch what ``vm`` holds in the background, until nothing is held."""
        running = self._drains.get(vm.vm_id)
        if running is not None and not running.done():
            return
        task = asyncio.create_task(self._drain_all(vm), name=f"drain:{vm.vm_id}")
        self._drains[vm.vm_id] = task
        task.add_done_callback(lambda t: self._drains.pop(vm.vm_id, None) if self._drains.get(vm.vm_id) is t else None)

    async def _drain_all(self, vm: VmEvents) -> None:
        # what arrives while a drain runs is held behind it, and goes in the next one
        while self.vms.get(vm.vm_id) is vm and vm.mode == "active" and vm.queued and not vm.draining:
            try:
                await self._drain(vm)
            except FerryError as exc:
                # still held, durably; the lease loop tries again
                log.info("held events of %s not dispatched yet: %s", vm.vm_id, exc.reason)
                return



@dataclass
class Batch:
    """Events of one VM waiting for the next flush, and what their dispatchers await."""

    events: list[Event]
    done: asyncio.Future[None]


def drained_ns(vm_id: str) -> str:
    return f"drained.{vm_id}"


def queue_ns(vm_id: str) -> str:
    return f"queue.{vm_id}"
