"""Coalescing: many internal messages to one routing key as one AMQP message.

Under load, hundreds of sagas send the same step to the same host service at once, and
the services answer on the same reply key. Per AMQP message, the client spends far more
(framing, confirms, deliveries, acks) than Ferry spends on the message itself, and the
broker writes each one to its quorum log. So while a publish to a routing key waits for
its confirm, further messages to that key wait in a *lane*, and go out together as one
batch once it is confirmed: group commit, as a database does with its log. A message
alone is published at once, as itself; nothing waits for company.

Only internal routing keys are coalesced (:func:`batchable`): host-service commands and
replies. Public keys (``migration.*``, ``vm.*.event``, ``alarm.*``) keep one message per
event, as the AsyncAPI contract says.

A batch is one body: for each message, a 4-byte length and its properties as JSON, then a
4-byte length and its body, unchanged (signatures cover the body bytes). The receiver
hands each message to the handler as a delivery of its own (:mod:`.amqp`).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson

from ..errors import InvalidMessage
from .interfaces import Message

BATCH_TYPE = "ferry.batch"
BATCH_CONTENT_TYPE = "application/x-ferry-batch"
MAX_ITEMS = 256
MAX_BATCH_BYTES = 1 << 20
# a message this large is sent alone (in its turn): batching it saves nothing
MAX_ITEM_BYTES = 64 * 1024
_LEN = struct.Struct(">I")
# internal keys that one queue alone is bound to (topology.py): a message of a batch sent
# back alone goes to that queue and no other. Public keys (migration.*, vm.*.event, alarm.*)
# and the fanned-out internal ones (inventory.*) are not coalesced.
_PREFIXES = ("host.", "reply.")


def batchable(routing_key: str) -> bool:
    """Commands to a host's services, and replies to a requester."""
    return routing_key.startswith(_PREFIXES)


def pack(messages: list[Message]) -> bytes:
    """One batch body holding ``messages``, in order."""
    parts: list[bytes] = []
    for m in messages:
        meta = orjson.dumps({
            "k": m.routing_key, "t": m.type, "i": m.message_id, "c": m.correlation_id,
            "r": m.reply_to, "h": m.headers, "s": m.timestamp,
        })
        parts += (_LEN.pack(len(meta)), meta, _LEN.pack(len(m.body)), m.body)
    return b"".join(parts)


def unpack(body: bytes) -> list[Message]:
    """The messages of a batch body; ``InvalidMessage`` says what is wrong with a bad one."""
    out: list[Message] = []
    view, pos, end = memoryview(body), 0, len(body)
    try:
        while pos < end:
            (n,) = _LEN.unpack_from(view, pos)
            meta = orjson.loads(view[pos + 4 : pos + 4 + n])
            pos += 4 + n
            (m,) = _LEN.unpack_from(view, pos)
            if pos + 4 + m > end:
                raise InvalidMessage("batch body ends inside a message")
            item = bytes(view[pos + 4 : pos + 4 + m])
            pos += 4 + m
            headers = meta.get("h") or {}
            if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
                raise InvalidMessage("batch item headers must be strings")
            out.append(Message(
                routing_key=str(meta["k"]), body=item, type=str(meta.get("t") or ""),
                message_id=str(meta.get("i") or ""), correlation_id=_opt(meta.get("c")),
                reply_to=_opt(meta.get("r")), headers=headers, timestamp=float(meta.get("s") or 0.0),
            ))
    except InvalidMessage:
        raise
    except (struct.error, orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidMessage(f"malformed batch: {exc}") from None
    if not out:
        raise InvalidMessage("empty batch")
    return out


def _opt(v: object) -> str | None:
    return None if v is None else str(v)


Send = Callable[[list[Message]], Awaitable[None]]


@dataclass
class _Lane:
    key: str
    busy: bool = False
    waiting: list[tuple[Message, asyncio.Future[None]]] = field(default_factory=list)


class Lanes:
    """One lane per routing key: a message finding its lane idle is sent at once; while a
    send is in flight, later messages queue and go out as batches of up to ``MAX_ITEMS``
    (``MAX_BATCH_BYTES``), in the order they were published."""

    def __init__(self, send: Send) -> None:
        self._send = send
        # one per routing key with a send in flight; an idle lane is dropped (reply keys come
        # and go with the requesters: months of CLI calls must not leave a lane each)
        self._lanes: dict[str, _Lane] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # batches of more than one message sent, for tests and metrics
        self.coalesced = 0  # messages that went in them

    async def publish(self, message: Message) -> None:
        lane = self._lanes.get(message.routing_key)
        if lane is None:
            lane = self._lanes[message.routing_key] = _Lane(message.routing_key)
        if lane.busy:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            lane.waiting.append((message, fut))
            await fut
            return
        lane.busy = True
        try:
            await self._send([message])
        finally:
            if lane.waiting:
                task = asyncio.create_task(self._drain(lane))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                self._idle(lane)

    async def _drain(self, lane: _Lane) -> None:
        try:
            while lane.waiting:
                take = _take(lane.waiting)
                del lane.waiting[: len(take)]
                try:
                    await self._send([m for m, _ in take])
                except BaseException as exc:
                    for _, f in take:
                        if not f.done():
                            f.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                else:
                    if len(take) > 1:
                        self.batches += 1
                        self.coalesced += len(take)
                    for _, f in take:
                        if not f.done():
                            f.set_result(None)
        finally:
            for _, f in lane.waiting:  # only if cancelled (the bus closes): nobody sends them
                if not f.done():
                    f.cancel()
            lane.waiting.clear()
            self._idle(lane)

    def _idle(self, lane: _Lane) -> None:
        # nothing waits in it and nothing is in flight: a publisher holding it now would have
        # queued in it, so the next one may start a new lane
        lane.busy = False
        if self._lanes.get(lane.key) is lane:
            del self._lanes[lane.key]

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _take(waiting: list[tuple[Message, asyncio.Future[None]]]) -> list[tuple[Message, asyncio.Future[None]]]:
    """The next batch: in order, up to the limits; a large message goes alone."""
    if len(waiting[0][0].body) > MAX_ITEM_BYTES:
        return waiting[:1]
    size, n = 0, 0
    for m, _ in waiting:
        size += len(m.body) + 256
        if n >= MAX_ITEMS or len(m.body) > MAX_ITEM_BYTES or (n and size > MAX_BATCH_BYTES):
            break
        n += 1
    return waiting[:n]
