"""A Bus that loses, duplicates and delays what is published, by rule, around any other Bus.

Used in place of the harness's shared :class:`MemoryBus`: every service's and the
client's publishes pass through :meth:`FaultyBus.publish`, where the first rule that
matches (routing-key pattern, message type, request or reply) acts on it. A reply is
matched through the request it answers (its correlation id), so "drop the answer to
FreezeEvents" is one rule.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any, Literal

from ferry_common.bus.interfaces import Consumer, DeliveryHandler, Message, QueueSpec
from ferry_common.bus.matching import topic_matches
from ferry_common.errors import Transient

Action = Literal["drop", "duplicate", "delay", "fail"]


@dataclass
class Rule:
    """What to do to which messages.

    ``types``: request message types (``FreezeEvents``); ``reply``: act on their answers
    instead of the requests; ``pattern``: a routing-key topic pattern, for messages that
    are not requests (``vm.*.event``); ``times``: how many to act on (None: all).
    ``blocking`` delays in the publisher (order kept); otherwise the delayed copy goes
    out later on its own and later messages overtake it.
    """

    action: Action
    types: tuple[str, ...] = ()
    reply: bool = False
    pattern: str | None = None
    times: int | None = 1
    delay_s: float = 0.0
    blocking: bool = False
    hits: int = 0
    label: str = ""

    def spent(self) -> bool:
        return self.times is not None and self.hits >= self.times


@dataclass
class FaultyBus:
    """Wraps ``inner``; ``rules`` may change at any time (tests arm them mid-saga)."""

    inner: Any
    rules: list[Rule] = field(default_factory=list)
    _requests: dict[str, str] = field(default_factory=dict)  # correlation id -> request type
    _late: set[asyncio.Task[None]] = field(default_factory=set)
    injected: dict[str, int] = field(default_factory=dict)
    # when set, the first bind and the first unbind of each routing key fail as if the
    # connection went while the broker was asked (the broker did nothing)
    flaky_bindings: bool = False
    _failed_bindings: set[tuple[str, str]] = field(default_factory=set)

    # ---- the Bus protocol ----------------------------------------------------------
    async def connect(self) -> None:
        await self.inner.connect()

    async def close(self) -> None:
        for t in list(self._late):
            t.cancel()
        await self.inner.close()

    async def publish(self, message: Message, *, mandatory: bool = True) -> None:
        rule = self._match(message)
        if rule is None:
            await self.inner.publish(message, mandatory=mandatory)
            return
        rule.hits += 1
        key = rule.label or rule.action
        self.injected[key] = self.injected.get(key, 0) + 1
        if rule.action == "drop":
            return  # lost in transit: the sender thinks it went out
        if rule.action == "fail":
            await asyncio.sleep(rule.delay_s)  # as long as the broker took to drop the connection
            raise Transient("publish failed: connection lost (injected)")  # the sender knows
        if rule.action == "duplicate":
            await self.inner.publish(message)
            await self.inner.publish(message)
            return
        if rule.blocking:
            await asyncio.sleep(rule.delay_s)
            await self.inner.publish(message)
            return
        task = asyncio.create_task(self._later(message, rule.delay_s))
        self._late.add(task)
        task.add_done_callback(self._late.discard)

    async def dead_letter(self, message: Message, reason: str, code: str) -> None:
        await self.inner.dead_letter(message, reason, code)

    async def consume(self, spec: QueueSpec, handler: DeliveryHandler) -> Consumer:
        return await self.inner.consume(spec, handler)  # type: ignore[no-any-return]

    async def bind(self, queue: str, routing_key: str) -> None:
        self._maybe_fail("bind", routing_key)
        await self.inner.bind(queue, routing_key)

    async def unbind(self, queue: str, routing_key: str) -> None:
        self._maybe_fail("unbind", routing_key)
        await self.inner.unbind(queue, routing_key)

    def _maybe_fail(self, op: str, routing_key: str) -> None:
        if not self.flaky_bindings or (op, routing_key) in self._failed_bindings:
            return
        self._failed_bindings.add((op, routing_key))
        self.injected[f"{op} failed"] = self.injected.get(f"{op} failed", 0) + 1
        raise Transient(f"{op} failed: connection lost (injected)")

    async def purge(self, queue: str) -> int:
        return int(await self.inner.purge(queue))

    def __getattr__(self, name: str) -> Any:  # MemoryBus extras (delete_queue, ...)
        return getattr(self.inner, name)

    # ---- rules ---------------------------------------------------------------------
    def arm(self, rule: Rule) -> Rule:
        self.rules.append(rule)
        return rule

    def disarm(self) -> None:
        self.rules.clear()

    async def drain(self) -> None:
        """Wait until every delayed message went out."""
        while self._late:
            with contextlib.suppress(Exception):
                await asyncio.gather(*list(self._late), return_exceptions=True)

    def _match(self, message: Message) -> Rule | None:
        is_reply = message.routing_key.startswith("reply.")
        request_type = None
        if is_reply and message.correlation_id:
            request_type = self._requests.pop(message.correlation_id, None)
        elif message.reply_to and message.correlation_id:
            self._requests[message.correlation_id] = message.type
            if len(self._requests) > 100_000:
                self._requests.pop(next(iter(self._requests)))
        for rule in self.rules:
            if rule.spent():
                continue
            if rule.types:
                if rule.reply and is_reply and request_type in rule.types:
                    return rule
                if not rule.reply and not is_reply and message.type in rule.types:
                    return rule
            elif rule.pattern is not None and topic_matches(rule.pattern, message.routing_key):
                return rule
        return None

    async def _later(self, message: Message, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        with contextlib.suppress(Exception):  # a late reply to a gone requester is fine
            await self.inner.publish(message)

