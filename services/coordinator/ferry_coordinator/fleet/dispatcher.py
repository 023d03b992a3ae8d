"""The dispatcher: starts queued migrations as slots free, and tells followers what holds the rest.

Every coordinator replica runs one. A pass claims entries (``FleetQueue.claim_next``, one store
transaction each, so the limits hold whatever the number of replicas claiming at once) and
starts each one's saga; then it explains the queue and announces the reasons that changed
(``ReasonLog``). Passes run when woken (a request queued, a saga ended, an inventory changed)
and on a short timer, so a slot freed by another replica is taken within ``interval_s``.

A replica that dies between a claim and the saga's creation leaves a started entry without a
saga. After ``grace_s`` any replica starts it (the saga's creation is idempotent by
``migration_id``, so of two replicas doing so at once one creates it and drives it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ferry_common.aio import one_pass
from ferry_common.clock import Clock, sleep_or_set

from ..store import SagaStore
from .metrics import observe_queue, observe_slots
from .queue import Decision, EntryState, QueueEntry
from .reasons import ReasonLog

log = logging.getLogger(__name__)

Start = Callable[[QueueEntry], Awaitable[None]]
Announce = Callable[[Decision], Awaitable[None]]
Refresh = Callable[[list[QueueEntry]], Awaitable[None]]


class Dispatcher:
    def __init__(
        self,
        store: SagaStore,
        clock: Clock,
        owner: str,
        *,
        start: Start,
        announce: Announce,
        refresh: Refresh | None = None,
        interval_s: float = 0.25,
        grace_s: float = 3.0,
    ) -> None:
        self.store = store
        self.clock = clock
        self.owner = owner
        self._start = start
        self._announce = announce
        self._refresh = refresh
        self.interval_s = interval_s
        self.grace_s = grace_s
        self.reasons = ReasonLog()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Passes until cancelled."""
        while True:
            self._wake.clear()
            await one_pass(self.pass_once, log, "dispatcher pass")
            await sleep_or_set(self.clock, self.interval_s, self._wake)

    async def pass_once(self) -> int:
        """Recover orphaned claims, start what may start, announce what holds the rest;
        returns how many started."""
        async with self._lock:
            queue = self.store.queue
            await self._recover()
            if self._refresh is not None:
                await self._refresh(await queue.entries(states={EntryState.QUEUED}))
            claimed = []
            while (entry := await queue.claim_next(self.owner, now=self.clock.now())) is not None:
                claimed.append(entry)
            # started together, not one after another: each start waits for the store and for
            # its `accepted` to be confirmed, and a wave's sagas then go out as one burst
            await asyncio.gather(*(self._start_safely(e) for e in claimed))
            now = self.clock.now()
            decisions = await queue.explain(now=now)
            for d in self.reasons.changes(decisions):
                await self._announce(d)
            observe_queue(decisions, now)
            observe_slots(await queue.entries(states={EntryState.STARTED}), await queue.limits())
            return len(claimed)

    async def _start_safely(self, entry: QueueEntry) -> None:
        try:
            await self._start(entry)
        except asyncio.CancelledError:
            raise
        except Exception:
            # the entry keeps its slot without a saga: _recover starts it after grace_s
            log.exception("starting %s failed", entry.migration_id)

    async def _recover(self) -> None:
        now = self.clock.now()
        for entry in await self.store.queue.entries(states={EntryState.STARTED}):
            if (entry.started_at or 0.0) > now - self.grace_s:
                continue  # its claimer is creating the saga
            if await self.store.get(entry.migration_id) is None:
                log.info("starting %s: claimed by %s, which created no saga", entry.migration_id, entry.owner)
                await self._start_safely(entry)
