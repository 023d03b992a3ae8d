"""A service's view of the bus: typed send, request/reply, and the consumer runtime.

Acknowledgement policy, in one place. A handler gets a validated model and returns
a model (the reply, if the message asked for one), a :class:`Forward` (the request
goes on to another service, which answers the requester) or ``None``; either way the
delivery is acknowledged after the handler finished. It raises to say anything
else: a non-retryable :class:`FerryError` (invalid message, unauthenticated, a
refused request) dead-letters the message with its reason and tells the sender
with an :class:`ErrorReply`; a retryable one sends it back for redelivery, up to the
queue's delivery limit, after which the broker dead-letters it. An unexpected
exception is a bug: the message is dead-lettered with the exception as reason, so
nothing is lost and the service keeps running.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from . import metrics
from .bus.interfaces import Bus, Consumer, Delivery, Message, QueueSpec
from .bus.matching import topic_matches
from .bus.topology import EXCHANGE
from .bus.topology import reply_to as reply_key
from .clock import Clock, SystemClock
from .errors import (
    FerryError,
    InvalidMessage,
    RemoteError,
    Replayed,
    StepTimeout,
    Transient,
    UnknownMessageType,
)
from .ids import new_id
from .messages import decode, encode, model_for, type_name
from .messages.base import Wire
from .messages.commands import ErrorReply
from .security import Authenticator, NoAuth
from .telemetry import attached, extract_context, inject_headers, tracer

log = logging.getLogger(__name__)
SENDER = "x-ferry-sender"
M = TypeVar("M", bound=Wire)


@dataclass(frozen=True, slots=True)
class Context:
    """What a handler may want to know about the message besides its body."""

    message: Message
    sender: str | None
    redelivered: bool


@dataclass(frozen=True, slots=True)
class Forward:
    """A handler's outcome: pass the request on, as ``model``, to ``routing_key``.

    The forwarded message keeps the request's reply-to and correlation id, so whoever
    handles it answers the original requester directly; this handler holds nothing while
    the next service works (a bulk transfer goes from one host to the other, not through
    the requester).
    """

    routing_key: str
    model: Wire


Outcome = Wire | Forward | None
Handler = Callable[[Any, Context], Awaitable[Outcome]]
Refused = Callable[[Message, FerryError], Awaitable[None]]


@dataclass
class Router:
    """Which handler takes which message type; public messages are typed by routing key."""

    handlers: dict[str, tuple[type[Wire], Handler]] = field(default_factory=dict)
    by_routing_key: dict[str, str] = field(default_factory=dict)
    # called after a message was dead-lettered as refused (not retried), e.g. to tell a
    # client without a reply queue, through another channel, what was wrong
    refused: Refused | None = None

    def add(self, model: type[M], handler: Callable[[M, Context], Awaitable[Outcome]]) -> None:
        self.handlers[model.__name__] = (model, handler)

    def route_key(self, pattern: str, model: type[Wire]) -> None:
        """Messages on ``pattern`` (a topic pattern) without a ``type`` are ``model``."""
        self.by_routing_key[pattern] = model.__name__

    def resolve(self, message: Message) -> tuple[type[Wire], Handler]:
        name = message.type or next(
            (n for p, n in self.by_routing_key.items() if topic_matches(p, message.routing_key)), ""
        )
        if not name:
            raise InvalidMessage(f"message on {message.routing_key!r} has no type")
        if name not in self.handlers:
            model_for(name)  # unknown type on the wire vs. known type sent to the wrong service
            raise UnknownMessageType(f"{name} is not handled here")
        return self.handlers[name]


class Endpoint:
    """Sends models as signed, traced messages and serves a router on a queue."""

    def __init__(
        self,
        bus: Bus,
        identity: str,
        *,
        clock: Clock | None = None,
        auth: Authenticator | None = None,
    ) -> None:
        self.bus = bus
        self.identity = identity
        self.clock = clock or SystemClock()
        self.auth: Authenticator = auth or NoAuth()
        self.instance = f"{identity.replace('/', '.')}.{new_id()[:8]}"
        self._pending: dict[str, asyncio.Future[Message]] = {}
        self._reply_consumer: Consumer | None = None
        self._consumers: list[Consumer] = []
        self.stats = {"handled": 0, "dead_lettered": 0, "retried": 0, "unauthenticated": 0}

    # ---- sending ------------------------------------------------------------------
    def build(
        self,
        routing_key: str,
        model: Wire,
        *,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        message_id: str | None = None,
    ) -> Message:
        headers = inject_headers({SENDER: self.identity})
        msg = Message(
            routing_key=routing_key,
            body=encode(model),
            type=type_name(model),
            message_id=message_id or new_id(),
            correlation_id=correlation_id,
            reply_to=reply_to,
            headers=headers,
            timestamp=self.clock.now(),
        )
        return self.auth.sign(msg)

    async def send(self, routing_key: str, model: Wire, *, mandatory: bool = True, **kwargs: Any) -> Message:
        """Publish ``model``; raises ``Unroutable`` if no queue takes it (unless not
        ``mandatory``: an announcement nobody listens to is dropped)."""
        msg = self.build(routing_key, model, **kwargs)
        await self.bus.publish(msg, mandatory=mandatory)
        return msg

    async def request(self, routing_key: str, model: Wire, *, timeout: float) -> Wire:
        """Send a request and wait for its reply; an ``ErrorReply`` raises ``RemoteError``."""
        await self.open_replies()
        correlation = new_id()
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[correlation] = fut
        try:
            await self.send(routing_key, model, correlation_id=correlation, reply_to=reply_key(self.instance))
            reply = await self._wait(fut, timeout, f"{type_name(model)} to {routing_key}")
        finally:
            self._pending.pop(correlation, None)
        answer = decode(reply.body, model_for(reply.type))
        if isinstance(answer, ErrorReply):
            raise RemoteError(answer.reason, code=answer.code, retryable=answer.retryable)
        return answer

    async def _wait(self, fut: asyncio.Future[Message], timeout: float, what: str) -> Message:
        if isinstance(self.clock, SystemClock):
            try:
                return await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                raise StepTimeout(f"no answer to {what} within {timeout:g}s") from None
        sleeper = asyncio.ensure_future(self.clock.sleep(timeout))
        try:
            racers: list[asyncio.Future[Any]] = [fut, sleeper]
            await asyncio.wait(racers, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
        if fut.done():
            return fut.result()
        raise StepTimeout(f"no answer to {what} within {timeout:g}s")

    async def open_replies(self) -> None:
        """Declare and consume this endpoint's reply queue now rather than at the first
        request: a requester that starts ready does not make its first request wait for it."""
        if self._reply_consumer is None:
            spec = QueueSpec(f"reply.{self.instance}", (reply_key(self.instance),), durable=False, prefetch=256)
            self._reply_consumer = await self.bus.consume(spec, self._on_reply)

    async def _on_reply(self, delivery: Delivery) -> None:
        await delivery.ack()
        msg = delivery.message
        try:
            self.auth.verify(msg)
        except FerryError as exc:
            self.stats["unauthenticated"] += 1
            await self.bus.dead_letter(msg, exc.reason, exc.code)
            return
        fut = self._pending.get(msg.correlation_id or "")
        if fut is not None and not fut.done():
            fut.set_result(msg)
            self.auth.accepted(msg)
        # a late or duplicated reply finds no waiter: nothing to do, the step is idempotent

    # ---- serving ------------------------------------------------------------------
    async def serve(self, spec: QueueSpec, router: Router) -> Consumer:
        async def on_delivery(delivery: Delivery) -> None:
            await self._handle(delivery, router)

        consumer = await self.bus.consume(spec, on_delivery)
        self._consumers.append(consumer)
        return consumer

    async def _handle(self, delivery: Delivery, router: Router) -> None:
        msg = delivery.message
        parent = extract_context(msg.headers)
        with attached(parent), tracer.start_as_current_span(
            f"handle {msg.type or msg.routing_key}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.destination.name": EXCHANGE,
                "messaging.rabbitmq.destination.routing_key": msg.routing_key,
                "messaging.message.id": msg.message_id,
                "ferry.service": self.identity,
                "ferry.delivery_count": delivery.delivery_count,
            },
        ) as span:
            try:
                sender = self.auth.verify(msg)
                model, handler = router.resolve(msg)
                body = decode(msg.body, model)
                _annotate(span, body)
                result = await handler(body, Context(msg, sender, delivery.redelivered))
                if isinstance(result, Forward):
                    await self.send(result.routing_key, result.model, correlation_id=msg.correlation_id,
                                    reply_to=msg.reply_to)
                elif msg.reply_to and result is not None:
                    await self._reply(msg, result)
                await delivery.ack()
                self.auth.accepted(msg)
                self.stats["handled"] += 1
                metrics.MESSAGES_HANDLED_TOTAL.labels(service=_service_label(self.identity)).inc()
            except Replayed as exc:
                if delivery.redelivered:
                    # handled before, but the ack was lost (a reconnect): settle it quietly
                    self.stats["duplicates"] = self.stats.get("duplicates", 0) + 1
                    await delivery.ack()
                else:
                    span.set_status(Status(StatusCode.ERROR, exc.reason))
                    await self._dead_letter(delivery, exc.reason, exc.code)
            except FerryError as exc:
                span.set_status(Status(StatusCode.ERROR, exc.reason))
                if exc.retryable:
                    self.stats["retried"] += 1
                    span.add_event("retry", {"reason": exc.reason})
                    await delivery.nack(requeue=True)
                elif await self._dead_letter(delivery, exc.reason, exc.code) and router.refused is not None:
                    try:
                        await router.refused(msg, exc)
                    except Exception:  # telling is best effort: the message is dead-lettered
                        log.exception("refusal of %s not announced", msg.type or msg.routing_key)
            except Exception as exc:  # a bug must not crash the service or lose the message
                log.exception("handler failed on %s", msg.type or msg.routing_key)
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, repr(exc)))
                await self._dead_letter(delivery, f"internal error: {exc!r}", "internal")

    async def _dead_letter(self, delivery: Delivery, reason: str, code: str) -> bool:
        """Dead-letter and tell the requester; False if it went back to the queue instead."""
        msg = delivery.message
        if code == "unauthenticated":
            self.stats["unauthenticated"] += 1
        self.stats["dead_lettered"] += 1
        metrics.MESSAGES_DEAD_LETTERED_TOTAL.labels(service=_service_label(self.identity), code=code).inc()
        log.warning("dead-lettering %s from %s: %s", msg.type or msg.routing_key, msg.headers.get(SENDER), reason)
        try:
            await self.bus.dead_letter(msg, reason, code)
            if msg.reply_to and code != "unauthenticated":
                await self._reply(msg, ErrorReply(code=code, reason=reason))
        except FerryError:
            # the dead-letter copy did not get out: let the broker redeliver the original
            await delivery.nack(requeue=True)
            return False
        await delivery.ack()
        return True

    async def _reply(self, request: Message, model: Wire) -> None:
        try:
            await self.send(request.reply_to or "", model, correlation_id=request.correlation_id)
        except FerryError as exc:
            if not exc.retryable:
                # the requester is gone (its reply queue was deleted); the answer is replayable
                log.info("reply to %s dropped: %s", request.reply_to, exc.reason)
                return
            raise Transient(exc.reason) from exc

    async def close(self) -> None:
        for c in self._consumers:
            await c.cancel()
        self._consumers.clear()
        if self._reply_consumer is not None:
            await self._reply_consumer.cancel()
            self._reply_consumer = None
        for fut in self._pending.values():
            if not fut.done():
                fut.cancel()


def _service_label(identity: str) -> str:
    # "host/host-a/sensor" -> "sensor": per-host series come from the scrape target, and a
    # label per host and VM would grow without bound across a fleet
    return identity.rsplit("/", 1)[-1] if identity.startswith("host/") else identity.split("/", 1)[0]


def _annotate(span: trace.Span, body: Wire) -> None:
    prefix = "ferry.query." if body.query else "ferry."
    for attr in ("migration_id", "vm_id"):
        value = getattr(body, attr, None)
        if isinstance(value, str):
            span.set_attribute(f"{prefix}{attr}", value)
