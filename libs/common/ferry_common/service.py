"""What every Ferry service shares: an endpoint, a queue, a router, idempotent steps."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .bus.interfaces import Consumer, QueueSpec
from .bus.topology import host_command, host_queue
from .endpoint import Context, Endpoint, Router
from .messages import decode, encode, model_for, type_name
from .messages.base import Wire

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Wire)
StepHandler = Callable[[M, Context], Awaitable[Wire | None]]


class StepMemo:
    """Answers already given, by (message type, migration id), so a replayed step gets the same answer."""

    def __init__(self) -> None:
        self._answers: dict[str, tuple[str, bytes]] = {}

    def get(self, key: str) -> Wire | None:
        found = self._answers.get(key)
        if found is None:
            return None
        return decode(found[1], model_for(found[0]))

    def put(self, key: str, answer: Wire) -> None:
        self._answers[key] = (type_name(answer), encode(answer))

    def forget(self, migration_id: str) -> None:
        for k in [k for k in self._answers if k.endswith(f":{migration_id}")]:
            del self._answers[k]


class HostService:
    """A per-host service: consumes ``ferry.<host>.<service>`` bound to ``host.<host>.<service>``."""

    service = "service"

    def __init__(self, host: str, endpoint: Endpoint) -> None:
        self.host = host
        self.endpoint = endpoint
        self.router = Router()
        self.memo = StepMemo()
        self._consumer: Consumer | None = None
        self.prefetch = 256

    @property
    def queue(self) -> str:
        return host_queue(self.host, self.service)

    def bindings(self) -> tuple[str, ...]:
        return (host_command(self.host, self.service),)

    def step(self, model: type[M], handler: StepHandler[M]) -> None:
        """Register a saga step handler, made idempotent by (type, migration_id)."""

        async def once(msg: M, ctx: Context) -> Wire | None:
            key = f"{model.__name__}:{getattr(msg, 'migration_id', '')}"
            done = self.memo.get(key)
            if done is not None:
                return done
            answer = await handler(msg, ctx)
            if answer is not None:
                self.memo.put(key, answer)
            return answer

        self.router.add(model, once)

    async def start(self) -> None:
        spec = QueueSpec(self.queue, self.bindings(), durable=True, prefetch=self.prefetch)
        self._consumer = await self.endpoint.serve(spec, self.router)
        log.info("%s on %s is serving %s", self.service, self.host, self.queue)

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.cancel()
            self._consumer = None

    def inspect(self, vm_id: str | None) -> dict[str, Any]:
        return {}
