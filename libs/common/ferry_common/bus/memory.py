"""An in-process broker with RabbitMQ's semantics where Ferry relies on them.

Topic routing, mandatory publishing (an unroutable message raises), manual acks,
redelivery on nack or consumer loss, a delivery limit with dead-lettering, and a
prefetch window per consumer. It runs the demo and the fast tests; the same
contract tests run against :class:`~ferry_common.bus.amqp.AmqpBus`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import Transient, Unroutable
from .interfaces import DeliveryHandler, Message, QueueSpec
from .matching import topic_matches
from .topology import CODE_HEADER, DEAD_LETTER_QUEUE, DELIVERY_LIMIT, REASON_HEADER


@dataclass
class _Queue:
    spec: QueueSpec
    bindings: set[str] = field(default_factory=set)
    ready: deque[tuple[Message, int]] = field(default_factory=deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    consumer: _MemoryConsumer | None = None


class _MemoryDelivery:
    __slots__ = ("message", "redelivered", "delivery_count", "_queue", "_bus", "_settled", "_consumer")

    def __init__(self, bus: MemoryBus, queue: _Queue, consumer: _MemoryConsumer, message: Message, count: int) -> None:
        self.message = message
        self.delivery_count = count
        self.redelivered = count > 1
        self._queue = queue
        self._bus = bus
        self._consumer = consumer
        self._settled = False

    async def ack(self) -> None:
        self._settle()

    async def nack(self, requeue: bool = True) -> None:
        if not self._settle():
            return
        if requeue:
            self._bus._requeue(self._queue, self.message, self.delivery_count)
        else:
            self._bus._to_dead_letter(self.message, "rejected without requeue", "rejected")

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        self._consumer.unacked.discard(self)
        self._consumer.window.release()
        return True


class _MemoryConsumer:
    def __init__(self, bus: MemoryBus, queue: _Queue, handler: DeliveryHandler) -> None:
        self.bus = bus
        self.queue = queue
        self.handler = handler
        self.window = asyncio.Semaphore(queue.spec.prefetch)
        self.unacked: set[_MemoryDelivery] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.loop_task = asyncio.create_task(self._run(), name=f"consume:{queue.spec.name}")

    async def _run(self) -> None:
        q = self.queue
        while True:
            await self.window.acquire()
            while not q.ready:
                q.wakeup.clear()
                await q.wakeup.wait()
            message, count = q.ready.popleft()
            delivery = _MemoryDelivery(self.bus, q, self, message, count + 1)
            self.unacked.add(delivery)
            task = asyncio.create_task(self._handle(delivery))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _handle(self, delivery: _MemoryDelivery) -> None:
        try:
            await self.handler(delivery)
        except Exception:  # the runtime settles; a raising raw handler means redelivery
            await delivery.nack(requeue=True)

    async def cancel(self) -> None:
        self.loop_task.cancel()
        for t in list(self.tasks):
            t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.loop_task
        for t in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        # what was delivered but not settled goes back, as the broker does on channel loss
        for d in sorted(self.unacked, key=lambda d: d.delivery_count, reverse=True):
            if d._settle():
                self.queue.ready.appendleft((d.message, d.delivery_count))
        if self.queue.consumer is self:
            self.queue.consumer = None
        self.queue.wakeup.set()


class MemoryBus:
    """The in-process broker. One instance is shared by every service of the demo."""

    def __init__(self) -> None:
        self.queues: dict[str, _Queue] = {}
        self.dead_letters: list[Message] = []
        self.published = 0
        self.closed = False
        self.fail_publish: BaseException | None = None  # fault injection for tests
        # bindings indexed: exact keys in a dict, the few patterns with * or # in a list
        self._exact: dict[str, list[_Queue]] = {}
        self._wild: list[tuple[str, _Queue]] = []

    async def connect(self) -> None:
        self.closed = False

    async def close(self) -> None:
        for q in list(self.queues.values()):
            if q.consumer is not None:
                await q.consumer.cancel()
        self.closed = True

    def _check(self) -> None:
        if self.closed:
            raise Transient("bus is closed")

    async def publish(self, message: Message, *, mandatory: bool = True) -> None:
        self._check()
        if self.fail_publish is not None:
            raise self.fail_publish
        targets = self._route(message.routing_key)
        if not targets:
            if not mandatory:
                return
            raise Unroutable(f"no queue bound for routing key {message.routing_key!r}")
        self.published += 1
        for q in targets:
            q.ready.append((message, 0))
            q.wakeup.set()
        await asyncio.sleep(0)

    def _route(self, key: str) -> list[_Queue]:
        """The queues ``key`` reaches, each once."""
        targets = list(self._exact.get(key, ()))
        for pattern, q in self._wild:
            if q not in targets and topic_matches(pattern, key):
                targets.append(q)
        return targets

    def _bind(self, q: _Queue, keys: Iterable[str]) -> None:
        for key in keys:
            if key in q.bindings:
                continue
            q.bindings.add(key)
            if "*" in key or "#" in key:
                self._wild.append((key, q))
            else:
                self._exact.setdefault(key, []).append(q)

    def _unbind(self, q: _Queue, key: str) -> None:
        if key not in q.bindings:
            return
        q.bindings.discard(key)
        if "*" in key or "#" in key:
            self._wild = [(p, x) for p, x in self._wild if not (p == key and x is q)]
        else:
            queues = self._exact.get(key, [])
            if q in queues:
                queues.remove(q)
            if not queues:
                self._exact.pop(key, None)

    async def dead_letter(self, message: Message, reason: str, code: str) -> None:
        self._check()
        self._to_dead_letter(message, reason, code)

    def _to_dead_letter(self, message: Message, reason: str, code: str) -> None:
        self.dead_letters.append(message.with_headers(**{REASON_HEADER: reason, CODE_HEADER: code}))

    def _requeue(self, queue: _Queue, message: Message, count: int) -> None:
        if queue.spec.durable and count >= DELIVERY_LIMIT:
            self._to_dead_letter(message, f"delivery limit of {DELIVERY_LIMIT} reached", "delivery_limit")
            return
        queue.ready.appendleft((message, count))
        queue.wakeup.set()

    async def consume(self, spec: QueueSpec, handler: DeliveryHandler) -> _MemoryConsumer:
        self._check()
        q = self.queues.get(spec.name)
        if q is None:
            q = self.queues[spec.name] = _Queue(spec)
        self._bind(q, spec.bindings)
        if q.consumer is not None:
            await q.consumer.cancel()
        q.consumer = _MemoryConsumer(self, q, handler)
        return q.consumer

    async def declare(self, spec: QueueSpec) -> None:
        """Declare a queue without consuming (for tests that look at what arrives)."""
        q = self.queues.setdefault(spec.name, _Queue(spec))
        self._bind(q, spec.bindings)

    async def bind(self, queue: str, routing_key: str) -> None:
        self._check()
        self._bind(self.queues[queue], (routing_key,))

    async def unbind(self, queue: str, routing_key: str) -> None:
        self._check()
        q = self.queues.get(queue)
        if q is not None:
            self._unbind(q, routing_key)

    async def purge(self, queue: str) -> int:
        q = self.queues.get(queue)
        if q is None:
            return 0
        n = len(q.ready)
        q.ready.clear()
        return n

    def dead_letter_reasons(self) -> list[str]:
        return [m.headers.get(REASON_HEADER, "") for m in self.dead_letters]

    async def delete_queue(self, name: str) -> None:
        q = self.queues.pop(name, None)
        if q is not None:
            for key in list(q.bindings):
                self._unbind(q, key)
            if q.consumer is not None:
                await q.consumer.cancel()

    def ensure_dead_letter_queue(self) -> None:
        self.queues.setdefault(DEAD_LETTER_QUEUE, _Queue(QueueSpec(DEAD_LETTER_QUEUE)))
