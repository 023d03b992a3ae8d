"""The bus interface, gathered in one place so tests can swap in either broker or a fake."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from ..ids import new_id


@dataclass(frozen=True, slots=True)
class Message:
    """An AMQP message as Ferry uses it: a JSON body plus properties and string headers."""

    routing_key: str
    body: bytes
    type: str = ""
    message_id: str = field(default_factory=new_id)
    correlation_id: str | None = None
    reply_to: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timestamp: float = 0.0

    def with_headers(self, **extra: str) -> Message:
        return replace(self, headers={**self.headers, **extra})


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """A queue and its bindings on the ``ferry`` exchange.

    ``durable`` queues are quorum queues with a delivery limit and dead-lettering;
    the others are exclusive, auto-deleted reply queues.
    """

    name: str
    bindings: tuple[str, ...] = ()
    durable: bool = True
    prefetch: int = 64


class Delivery(Protocol):
    """One received message; settled exactly once by the consumer runtime."""

    message: Message
    redelivered: bool
    delivery_count: int

    async def ack(self) -> None: ...

    async def nack(self, requeue: bool = True) -> None: ...


DeliveryHandler = Callable[[Delivery], Awaitable[None]]


class Consumer(Protocol):
    async def cancel(self) -> None: ...


class Bus(Protocol):
    """Topic exchange ``ferry``, publisher confirms with mandatory routing, manual acks."""

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, message: Message, *, mandatory: bool = True) -> None:
        """Publish and wait for the broker's confirm; raise ``Unroutable`` if it is returned.

        ``mandatory=False`` is for announcements that may have no audience (status events):
        a message no queue takes is dropped by the broker instead of coming back."""

    async def dead_letter(self, message: Message, reason: str, code: str) -> None:
        """Publish a copy of ``message`` to the dead-letter exchange, with the reason."""

    async def consume(self, spec: QueueSpec, handler: DeliveryHandler) -> Consumer:
        """Declare the queue and its bindings and start delivering to ``handler``."""

    async def bind(self, queue: str, routing_key: str) -> None: ...

    async def unbind(self, queue: str, routing_key: str) -> None: ...

    async def purge(self, queue: str) -> int: ...
