"""What the autonomic tests share: a cluster whose sim hosts carry a load model, and a
sampler of the automatic migrations the coordinator's dispatcher has started at once."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from ferry_common.bus.interfaces import QueueSpec
from ferry_common.bus.topology import COORDINATOR_QUERY, recommendation_status
from ferry_common.endpoint import Context, Router
from ferry_common.messages.recommendations import (
    ListRecommendations,
    RecommendationEvent,
    RecommendationList,
)
from ferry_coordinator.autonomic import AutonomicOptions
from ferry_coordinator.balance import BalanceRules
from ferry_coordinator.fleet.queue import EntryState, Priority
from ferry_coordinator.store import SagaStore

FAST_RULES = BalanceRules(threshold=0.3, target=0.2, hold_rounds=2, min_gain=0.001, cooldown_s=3600.0,
                          max_in_flight=1, interval_s=0.4, source_hosts=3)


def options(level: str, **kw: Any) -> AutonomicOptions:
    return AutonomicOptions(rules=kw.pop("rules", FAST_RULES), level=level, lease_s=kw.pop("lease_s", 2.0), **kw)


@dataclass
class AutomaticSampler:
    """Samples the started queue entries: the most automatic (REBALANCE) ones at once."""

    store: SagaStore
    endpoint: Any
    clock: Any
    max_automatic: int = 0  # most REBALANCE entries seen started at once
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            live = await self.store.queue.entries(states=[EntryState.STARTED])
            auto = sum(1 for e in live if e.priority == Priority.REBALANCE)
            self.max_automatic = max(self.max_automatic, auto)
            await asyncio.sleep(0.05)


async def recommendations(client: Any) -> RecommendationList:
    ans = await client.endpoint.request(COORDINATOR_QUERY, ListRecommendations(), timeout=5.0)
    assert isinstance(ans, RecommendationList), ans
    return ans


async def recommendation_events(c: Any) -> list[RecommendationEvent]:
    """Every ``recommendation.*`` event from now on, as it arrives (a recommendation can be
    superseded before a listing sees it)."""
    seen: list[RecommendationEvent] = []
    router = Router()
    router.route_key(recommendation_status("*"), RecommendationEvent)

    async def on(msg: RecommendationEvent, ctx: Context) -> None:
        seen.append(msg)

    router.add(RecommendationEvent, on)
    spec = QueueSpec(f"recommendations.{c.client.endpoint.instance}", (recommendation_status("*"),), durable=False)
    await c.client.endpoint.serve(spec, router)
    return seen
