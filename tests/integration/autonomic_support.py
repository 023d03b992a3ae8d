"""What the autonomic tests share: a cluster whose sim hosts carry a load model, and

TEST-ONLY DISPATCHER (:class:`QueueStarter`): the coordinator's dispatcher of queued entries
is built on another branch (``fleet-path``). Until it is merged, these tests start what the
balancer queues themselves: claim the next entry from the store's queue (which keeps the
limits: cluster, per host, and one automatic migration at a time) and publish its
MigrateRequest. Once the real dispatcher runs in the coordinator, drop this class and the
``starter`` fixture uses; nothing else in the tests depends on it.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

from ferry_common.bus.topology import COORDINATOR_QUERY, MIGRATION_REQUESTED
from ferry_common.messages.public import MigrateRequest
from ferry_common.messages.recommendations import ListRecommendations, RecommendationList
from ferry_coordinator.autonomic import AutonomicOptions
from ferry_coordinator.balance import BalanceRules
from ferry_coordinator.fleet.queue import EntryState, Priority
from ferry_coordinator.store import SagaStore

FAST_RULES = BalanceRules(threshold=0.3, target=0.2, hold_rounds=2, min_gain=0.001, cooldown_s=3600.0,
                          max_in_flight=1, interval_s=0.4, source_hosts=3)


def options(level: str, **kw: Any) -> AutonomicOptions:
    return AutonomicOptions(rules=kw.pop("rules", FAST_RULES), level=level, lease_s=kw.pop("lease_s", 2.0), **kw)


@dataclass
class QueueStarter:
    """TEST-ONLY: starts queued entries (see the module's docstring) and samples the slots."""

    store: SagaStore
    endpoint: Any
    clock: Any
    owner: str = "test-starter"
    started: list[str] = field(default_factory=list)
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
            entry = await self.store.queue.claim_next(self.owner, now=self.clock.now())
            if entry is None:
                await asyncio.sleep(0.05)
                continue
            assert entry.target_host is not None
            body = dict(entry.request, target_host=entry.target_host, migration_id=entry.migration_id)
            await self.endpoint.send(MIGRATION_REQUESTED, MigrateRequest.model_validate(body))
            self.started.append(entry.migration_id)


async def recommendations(client: Any) -> RecommendationList:
    ans = await client.endpoint.request(COORDINATOR_QUERY, ListRecommendations(), timeout=5.0)
    assert isinstance(ans, RecommendationList), ans
    return ans
