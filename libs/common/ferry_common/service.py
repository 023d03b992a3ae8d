"""What every Ferry service shares: an endpoint, a queue, a router, idempotent steps."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson

from .bus.interfaces import Consumer, QueueSpec
from .bus.topology import host_command, host_queue
from .endpoint import Context, Endpoint, Router
from .messages import decode, encode, model_for, type_name
from .messages.base import Wire
from .state import MemoryStateStore, StateStore

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Wire)
StepHandler = Callable[[M, Context], Awaitable[Wire | None]]


class StepMemo:
    """Answers already given, by (message type, migration id), so a replayed step gets the
    same answer, also after the service restarted (they are kept in its state store)."""

    NS = "memo"

    def __init__(self, state: StateStore) -> None:
        self._state = state
        self._answers: dict[str, tuple[str, bytes]] = {}

    async def load(self) -> None:
        for key, value in await self._state.items(self.NS):
            self._answers[key] = (value["type"], orjson.dumps(value["body"]))

    def get(self, key: str) -> Wire | None:
        found = self._answers.get(key)
        if found is None:
            return None
        return decode(found[1], model_for(found[0]))

    async def put(self, key: str, answer: Wire) -> None:
        body = encode(answer)
        # durable before the request is acknowledged: a replay after a crash finds it
        await self._state.put(self.NS, key, {"type": type_name(answer), "body": orjson.loads(body)})
        self._answers[key] = (type_name(answer), body)


class HostService:
    """A per-host service: consumes ``ferry.<host>.<service>`` bound to ``host.<host>.<service>``."""

    service = "service"

    def __init__(self, host: str, endpoint: Endpoint, state: StateStore | None = None) -> None:
        self.host = host
        self.endpoint = endpoint
        self.state: StateStore = state or MemoryStateStore()
        self.router = Router()
        self.memo = StepMemo(self.state)
        self._consumer: Consumer | None = None
        self._restored = False
        self.prefetch = 256

    @property
    def queue(self) -> str:
        return host_queue(self.host, self.service)

    def bindings(self) -> tuple[str, ...]:
        return (host_command(self.host, self.service),)

    def step(self, model: type[M], handler: StepHandler[M]) -> None:
        """Register a saga step handler, made idempotent by (type, migration_id[, round])."""

        async def once(msg: M, ctx: Context) -> Wire | None:
            key = f"{model.__name__}:{getattr(msg, 'migration_id', '')}"
            if (n := getattr(msg, "round", None)) is not None:
                # a step sent once per round (MigrationState): each round is its own step, a
                # replay of a round gets that round's answer; keyed by migration alone, every
                # round after the first was answered from the memo and never applied
                key += f":{n}"
            done = self.memo.get(key)
            if done is not None:
                return done
            answer = await handler(msg, ctx)
            if answer is not None:
                await self.memo.put(key, answer)
            return answer

        self.router.add(model, once)

    async def restore(self) -> None:
        """Reload what the service keeps across restarts (called once, before consuming)."""

    async def start(self) -> None:
        if not self._restored:
            await self.memo.load()
            await self.restore()
            self._restored = True
        spec = QueueSpec(self.queue, self.bindings(), durable=True, prefetch=self.prefetch)
        self._consumer = await self.endpoint.serve(spec, self.router)
        log.info("%s on %s is serving %s", self.service, self.host, self.queue)

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.cancel()
            self._consumer = None

    def inspect(self, vm_id: str | None) -> dict[str, Any]:
        return {}
