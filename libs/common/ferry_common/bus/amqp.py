"""The RabbitMQ bus, on aio-pika.

What it promises: durable quorum queues with a delivery limit and a dead-letter
exchange, persistent messages, publisher confirms with mandatory routing (a
returned message raises :class:`Unroutable`), manual acks, and a robust
connection that restores the queues, bindings and consumers this object holds.
Internal messages to one routing key are coalesced under load (:mod:`.batch`); each
still reaches its handler as a delivery of its own, settled on its own.
"""

from __future__ import annotations

import asyncio
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
from pydantic import SecretStr

from .. import metrics
from ..errors import FerryError, InvalidMessage, Transient, Unroutable
from ..ids import new_id
from ..settings import Settings
from ..tls import TlsSettings, tls_context
from .amqp_delivery import (
    CLOSE_TIMEOUT_S,
    REQUEUED,
    SENT_AT,
    _AmqpConsumer,
    _AmqpDelivery,
    _ItemDelivery,
)
from .batch import BATCH_CONTENT_TYPE, BATCH_TYPE, Lanes, batchable, pack, unpack
from .failover import connect_first, split_urls
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


def durable_queue_arguments() -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-delivery-limit": DELIVERY_LIMIT,
    }


class AmqpBus:
    """RabbitMQ through one robust connection: a publishing channel plus one channel per consumer.
    ``url`` may list several nodes of a cluster, comma-separated: they are tried in turn."""

    def __init__(self, url: str, *, ssl_context: ssl.SSLContext | None = None, name: str = "ferry",
                 coalesce: bool = True) -> None:
        self.url = url
        self.urls = split_urls(url)
        self.ssl_context = ssl_context
        self.name = name
        # coalesce=False (FERRY_AMQP_COALESCE=0) sends every message as itself (same contract)
        self._lanes = Lanes(self._send) if coalesce else None
        self.amqp_published = 0  # AMQP messages, batches counting once
        self._conn: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._exchange: AbstractRobustExchange | None = None
        self._dlx: AbstractRobustExchange | None = None
        # robust reconnection restores only what we still reference: keep them all here
        self._queues: dict[str, AbstractRobustQueue] = {}
        self._consumers: dict[str, _AmqpConsumer] = {}

    @classmethod
    def from_settings(cls, settings: Settings, *, name: str = "ferry") -> AmqpBus:
        """A bus on ``AMQP_URL`` with TLS and coalescing as the settings say (unconnected)."""
        url = settings.amqp_url.get_secret_value()
        tls = TlsSettings(ca_file=settings.amqp_ca_file, cert_file=settings.amqp_cert_file,
                          key_file=settings.amqp_key_file)
        return cls(url, ssl_context=tls_context(split_urls(url)[0], tls), name=name, coalesce=settings.amqp_coalesce)

    @classmethod
    def from_env(cls, url: str, *, name: str = "ferry") -> AmqpBus:
        """:meth:`from_settings` for ``url``, the rest from the environment (tests, scripts)."""
        return cls.from_settings(Settings(amqp_url=SecretStr(url)), name=name)

    async def connect(self) -> None:
        kwargs: dict[str, Any] = {"client_properties": {"connection_name": self.name}}
        if self.ssl_context is not None:
            kwargs["ssl_context"] = self.ssl_context
        try:
            self._conn = await connect_first(self.urls, kwargs)
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
            where = ", ".join(_redact(u) for u in self.urls)
            raise Transient(f"cannot connect to RabbitMQ at {where}: {exc}") from exc

    async def close(self) -> None:
        if self._lanes is not None:
            await self._lanes.close()
        for c in list(self._consumers.values()):
            await c.cancel()
        self._consumers.clear()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.close(), CLOSE_TIMEOUT_S)
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

    @property
    def coalescing(self) -> Lanes | None:
        return self._lanes

    async def publish(self, message: Message, *, mandatory: bool = True) -> None:
        if self._lanes is not None and mandatory and batchable(message.routing_key):
            await self._lanes.publish(message)
        else:
            await self._publish(self._require(self._exchange), message, mandatory=mandatory)

    async def _send(self, messages: list[Message]) -> None:
        exchange = self._require(self._exchange)
        if len(messages) == 1:
            await self._publish(exchange, messages[0])
            return
        batch = aio_pika.Message(
            body=pack(messages),
            content_type=BATCH_CONTENT_TYPE,
            type=BATCH_TYPE,
            message_id=new_id(),
            headers={"x-ferry-batch": len(messages)},
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await self._publish_raw(exchange, batch, messages[0].routing_key)
        metrics.AMQP_COALESCED_TOTAL.inc(len(messages))

    async def _requeue(self, message: Message, count: int) -> None:
        """Back to its queue alone, at the back: a coalesced key is bound by that queue only
        (:func:`~.batch.batchable`), so it reaches no other, and the ``ferry`` exchange is
        the one a service's broker user may publish to."""
        m = message.with_headers(**{REQUEUED: str(count)})
        await self._publish(self._require(self._exchange), m)

    async def dead_letter(self, message: Message, reason: str, code: str) -> None:
        m = message.with_headers(**{REASON_HEADER: reason[:1000], CODE_HEADER: code})
        await self._publish(self._require(self._dlx), m)

    async def _publish(self, exchange: AbstractRobustExchange, message: Message, *, mandatory: bool = True) -> None:
        await self._publish_raw(exchange, self._amqp_message(message), message.routing_key, mandatory=mandatory)

    async def _publish_raw(self, exchange: AbstractRobustExchange, message: aio_pika.Message, routing_key: str,
                           *, mandatory: bool = True) -> None:
        self.amqp_published += 1
        metrics.AMQP_PUBLISHED_TOTAL.inc()
        try:
            await exchange.publish(message, routing_key, mandatory=mandatory, timeout=30)
        except aiormq.exceptions.PublishError as exc:
            raise Unroutable(f"no queue bound for routing key {routing_key!r}") from exc
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
            delivery = _AmqpDelivery(raw, self)
            if raw.type == BATCH_TYPE and spec.name != DEAD_LETTER_QUEUE:  # the end of the line takes it as it is
                await self._on_batch(spec.name, delivery, handler)
                return
            try:
                await handler(delivery)
            except Exception:
                log.exception("handler for %s raised; message goes back for redelivery", spec.name)
                await delivery.nack(requeue=True)

        tag = await queue.consume(on_message, no_ack=False)
        consumer = _AmqpConsumer(queue, channel, tag)
        self._consumers[spec.name] = consumer
        return consumer

    async def _on_batch(self, queue: str, delivery: _AmqpDelivery, handler: DeliveryHandler) -> None:
        """Each message of a batch goes to ``handler`` as its own delivery, all at once as
        separate deliveries would; the batch is acknowledged when every one is settled."""
        try:
            messages = unpack(delivery.message.body)
            key = delivery.message.routing_key
            if any(m.routing_key != key for m in messages):
                # what a message was signed for must be where it was delivered
                raise InvalidMessage(f"a batch on {key!r} holds messages for another routing key")
        except InvalidMessage as exc:
            try:
                await self.dead_letter(delivery.message, exc.reason, exc.code)
            except FerryError:
                await delivery.nack(requeue=True)
                return
            await delivery.ack()
            return
        items = [_ItemDelivery(self, m, delivery.redelivered, delivery.delivery_count) for m in messages]

        async def one(item: _ItemDelivery) -> None:
            try:
                await handler(item)
            except Exception:
                log.exception("handler for %s raised; message goes back for redelivery", queue)
                await item.nack(requeue=True)

        await asyncio.gather(*(one(i) for i in items))
        if any(i.failed for i in items):
            # one of them could not be sent back alone: the whole batch comes again, and the
            # others, handled already, are answered as the replays they are
            await delivery.nack(requeue=True)
        else:
            await delivery.ack()

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
