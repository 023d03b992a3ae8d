"""What the RabbitMQ bus hands to a handler and what it consumes with: a delivery of its own
message, one message of a coalesced batch (settled on its own), and a consumer to cancel."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustQueue

from ..errors import FerryError
from .interfaces import Message
from .topology import DELIVERY_LIMIT

if TYPE_CHECKING:
    from .amqp import AmqpBus

SENT_AT = "x-ferry-sent-at"
# a message of a batch that went back to its queue alone: how often
REQUEUED = "x-ferry-requeued"
CLOSE_TIMEOUT_S = 3.0


class _AmqpDelivery:
    __slots__ = ("message", "redelivered", "delivery_count", "_raw", "_bus", "_requeued")

    def __init__(self, raw: AbstractIncomingMessage, bus: AmqpBus) -> None:
        self._raw = raw
        self._bus = bus
        headers = {k: _header_str(v) for k, v in (raw.headers or {}).items()}
        sent_at = headers.pop(SENT_AT, "0")
        requeued = self._requeued = _int(headers.pop(REQUEUED, "0"))
        self.message = Message(
            routing_key=raw.routing_key or "",
            body=raw.body,
            type=raw.type or "",
            message_id=raw.message_id or "",
            correlation_id=raw.correlation_id,
            reply_to=raw.reply_to,
            headers=headers,
            timestamp=_float(sent_at),
        )
        self.redelivered = bool(raw.redelivered) or requeued > 0
        count = headers.get("x-delivery-count")
        self.delivery_count = requeued + (int(count) + 1 if count and count.isdigit() else (2 if raw.redelivered else 1))

    async def ack(self) -> None:
        # after a reconnect the old channel is gone: the broker redelivers, which is safe
        with contextlib.suppress(aiormq.exceptions.AMQPError, RuntimeError, ConnectionError):
            await self._raw.ack()

    async def nack(self, requeue: bool = True) -> None:
        if requeue and self._requeued:
            # a message of a batch that already went back alone: the broker's delivery count
            # started again with it, so this side keeps counting, and applies the limit
            try:
                await _send_back(self._bus, self.message, self.delivery_count)
            except FerryError:
                pass  # not sent back: the broker redelivers this copy instead
            else:
                await self.ack()
                return
        with contextlib.suppress(aiormq.exceptions.AMQPError, RuntimeError, ConnectionError):
            await self._raw.nack(requeue=requeue)


async def _send_back(bus: AmqpBus, message: Message, count: int) -> None:
    """Requeue one message alone, or dead-letter it once it was delivered ``DELIVERY_LIMIT``
    times, as the broker does with a message of its own."""
    if count < DELIVERY_LIMIT:
        await bus._requeue(message, count)
    else:
        await bus.dead_letter(message, f"delivery limit of {DELIVERY_LIMIT} reached", "delivery_limit")


class _ItemDelivery:
    """One message of a batch. Its settlement is its own: a nack sends it back to the queue
    alone (or dead-letters it at the delivery limit), and the batch is acknowledged once
    every message of it is settled."""

    __slots__ = ("message", "redelivered", "delivery_count", "failed", "_bus", "_settled")

    def __init__(self, bus: AmqpBus, message: Message, redelivered: bool, count: int) -> None:
        self.message = message
        self.redelivered = redelivered
        self.delivery_count = count
        self.failed = False  # its requeue or dead-letter copy did not get out: redeliver the batch
        self._bus = bus
        self._settled = False

    async def ack(self) -> None:
        self._settled = True

    async def nack(self, requeue: bool = True) -> None:
        if self._settled:
            return
        self._settled = True
        try:
            if requeue:
                await _send_back(self._bus, self.message, self.delivery_count)
            else:
                await self._bus.dead_letter(self.message, "rejected without requeue", "rejected")
        except FerryError:
            self.failed = True


def _int(s: str) -> int:
    return int(s) if s.isdigit() else 0


def _header_str(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v)


def _float(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        return 0.0


class _AmqpConsumer:
    def __init__(self, queue: AbstractRobustQueue, channel: AbstractRobustChannel, tag: str) -> None:
        self.queue = queue
        self.channel = channel
        self.tag = tag
        self._cancelled = False

    async def cancel(self) -> None:
        # once: a service and its endpoint both cancel what they serve, and a second
        # Basic.Cancel or Channel.Close for a channel already closed is a connection error
        if self._cancelled:
            return
        self._cancelled = True
        # bounded: with the broker gone, a robust channel waits for it to come back, and a
        # service told to stop (SIGTERM) would never get to exit
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.queue.cancel(self.tag), CLOSE_TIMEOUT_S)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.channel.close(), CLOSE_TIMEOUT_S)
