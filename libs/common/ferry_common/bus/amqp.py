"""The RabbitMQ bus, on aio-pika.

What it promises: durable quorum queues with a delivery limit and a dead-letter
exchange, persistent messages, publisher confirms with mandatory routing (a
returned message raises :class:`Unroutable`), manual acks, and a robust
connection that restores the queues, bindings and consumers this object holds.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustExchange,
    AbstractRobustQueue,
)

from ..errors import Transient, Unroutable
from ..tls import TlsSettings, tls_context
from .interfaces import DeliveryHandler, Message, QueueSpec
from .topology import (
    CODE_HEADER,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DELIVERY_LIMIT,
    EXCHANGE,
    REASON_HEADER,
)

log = logging.getLogger(__name__)
SENT_AT = "x-ferry-sent-at"


def durable_queue_arguments() -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-delivery-limit": DELIVERY_LIMIT,
    }


class _AmqpDelivery:
    __slots__ = ("message", "redelivered", "delivery_count", "_raw")

    def __init__(self, raw: AbstractIncomingMessage) -> None:
        self._raw = raw
        headers = {k: _header_str(v) for k, v in (raw.headers or {}).items()}
        sent_at = headers.pop(SENT_AT, "0")
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
        self.redelivered = bool(raw.redelivered)
        count = headers.get("x-delivery-count")
        self.delivery_count = int(count) + 1 if count and count.isdigit() else (2 if raw.redelivered else 1)

    async def ack(self) -> None:
        # after a reconnect the old channel is gone: the broker redelivers, which is safe
        with contextlib.suppress(aiormq.exceptions.AMQPError, RuntimeError, ConnectionError):
            await self._raw.ack()

    async def nack(self, requeue: bool = True) -> None:
        with contextlib.suppress(aiormq.exceptions.AMQPError, RuntimeError, ConnectionError):
            await self._raw.nack(requeue=requeue)


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

    async def cancel(self) -> None:
        with contextlib.suppress(Exception):
            await self.queue.cancel(self.tag)
        with contextlib.suppress(Exception):
            await self.channel.close()


class AmqpBus:
    """RabbitMQ through one robust connection: a publishing channel plus one channel per consumer."""

    def __init__(self, url: str, *, ssl_context: ssl.SSLContext | None = None, name: str = "ferry") -> None:
        self.url = url
        self.ssl_context = ssl_context
        self.name = name
        self._conn: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._exchange: AbstractRobustExchange | None = None
        self._dlx: AbstractRobustExchange | None = None
        # robust reconnection restores only what we still reference: keep them all here
        self._queues: dict[str, AbstractRobustQueue] = {}
        self._consumers: dict[str, _AmqpConsumer] = {}

    @classmethod
    def from_env(cls, url: str, *, name: str = "ferry") -> AmqpBus:
        """A bus for ``url`` with TLS as ``FERRY_AMQP_*`` configures it (:mod:`ferry_common.tls`)."""
        return cls(url, ssl_context=tls_context(url, TlsSettings.from_env()), name=name)

    async def connect(self) -> None:
        kwargs: dict[str, Any] = {"client_properties": {"connection_name": self.name}}
        if self.ssl_context is not None:
            kwargs["ssl_context"] = self.ssl_context
        try:
            self._conn = await aio_pika.connect_robust(self.url, **kwargs)
            self._channel = await self._conn.channel(publisher_confirms=True, on_return_raises=True)
            self._exchange = await self._channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
            self._dlx = await self._channel.declare_exchange(
                DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
            )
            dlq = await self._channel.declare_queue(
                DEAD_LETTER_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
            )
            await dlq.bind(self._dlx, "#")
        except (aiormq.exceptions.AMQPError, OSError) as exc:
            raise Transient(f"cannot connect to RabbitMQ at {_redact(self.url)}: {exc}") from exc

    async def close(self) -> None:
        for c in list(self._consumers.values()):
            await c.cancel()
        self._consumers.clear()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
        self._conn = None

    def _amqp_message(self, message: Message) -> aio_pika.Message:
        headers: dict[str, Any] = dict(message.headers)
        headers[SENT_AT] = repr(message.timestamp)
        return aio_pika.Message(
            body=message.body,
            content_type="application/json",
            type=message.type or None,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )

    async def publish(self, message: Message) -> None:
        await self._publish(self._require(self._exchange), message)

    async def dead_letter(self, message: Message, reason: str, code: str) -> None:
        m = message.with_headers(**{REASON_HEADER: reason[:1000], CODE_HEADER: code})
        await self._publish(self._require(self._dlx), m)

    async def _publish(self, exchange: AbstractRobustExchange, message: Message) -> None:
        try:
            await exchange.publish(self._amqp_message(message), message.routing_key, mandatory=True, timeout=30)
        except aiormq.exceptions.PublishError as exc:
            raise Unroutable(f"no queue bound for routing key {message.routing_key!r}") from exc
        except aiormq.exceptions.DeliveryError as exc:
            raise Transient(f"broker refused the message: {exc}") from exc
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError, TimeoutError) as exc:
            raise Transient(f"publish failed: {exc!r}") from exc

    async def _declare(self, spec: QueueSpec, channel: AbstractRobustChannel) -> AbstractRobustQueue:
        exchange = await channel.get_exchange(EXCHANGE)
        if spec.name == DEAD_LETTER_QUEUE:
            # the end of the line: no dead-lettering of its own (an inspector may consume it)
            queue = await channel.declare_queue(spec.name, durable=True, arguments={"x-queue-type": "quorum"})
        elif spec.durable:
            queue = await channel.declare_queue(spec.name, durable=True, arguments=durable_queue_arguments())
        else:
            queue = await channel.declare_queue(spec.name, exclusive=True, auto_delete=True)
        for key in spec.bindings:
            await queue.bind(exchange, key)
        return queue  # type: ignore[return-value]

    async def declare(self, spec: QueueSpec) -> None:
        self._queues[spec.name] = await self._declare(spec, self._require(self._channel))

    async def consume(self, spec: QueueSpec, handler: DeliveryHandler) -> _AmqpConsumer:
        conn = self._require(self._conn)
        channel: AbstractRobustChannel = await conn.channel(publisher_confirms=False)  # type: ignore[assignment]
        await channel.set_qos(prefetch_count=spec.prefetch)
        queue = await self._declare(spec, channel)
        self._queues[spec.name] = queue

        async def on_message(raw: AbstractIncomingMessage) -> None:
            delivery = _AmqpDelivery(raw)
            try:
                await handler(delivery)
            except Exception:
                log.exception("handler for %s raised; message goes back for redelivery", spec.name)
                await delivery.nack(requeue=True)

        tag = await queue.consume(on_message, no_ack=False)
        consumer = _AmqpConsumer(queue, channel, tag)
        self._consumers[spec.name] = consumer
        return consumer

    async def bind(self, queue: str, routing_key: str) -> None:
        q = self._queues[queue]
        try:
            await q.bind(self._require(self._exchange), routing_key)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            raise Transient(f"bind failed: {exc!r}") from exc

    async def unbind(self, queue: str, routing_key: str) -> None:
        q = self._queues.get(queue)
        if q is None:
            return
        try:
            await q.unbind(self._require(self._exchange), routing_key)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            raise Transient(f"unbind failed: {exc!r}") from exc

    async def purge(self, queue: str) -> int:
        q = self._queues.get(queue)
        if q is None:
            return 0
        result = await q.purge()
        return int(getattr(result, "message_count", 0) or 0)

    @staticmethod
    def _require(obj: Any) -> Any:
        if obj is None:
            raise Transient("bus is not connected")
        return obj


def _redact(url: str) -> str:
    if "@" in url and "//" in url:
        scheme, rest = url.split("//", 1)
        return f"{scheme}//***@{rest.split('@', 1)[1]}"
    return url
