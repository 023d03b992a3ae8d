"""Clocks, injectable so that timeouts are tested without sleeping."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    """What time is it, and wait a while."""

    def now(self) -> float:
        """Wall-clock seconds since the epoch (for timestamps on the wire)."""

    def monotonic(self) -> float:
        """Seconds for measuring durations and deadlines."""

    async def sleep(self, seconds: float) -> None:
        """Suspend for ``seconds`` of this clock's time."""


async def sleep_or_set(clock: Clock, seconds: float, event: asyncio.Event) -> None:
    """Sleep ``seconds`` of ``clock``'s time, or less: return as soon as ``event`` is set."""
    sleeper = asyncio.ensure_future(clock.sleep(max(seconds, 0.0)))
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({sleeper, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # cancelled, not awaited: awaiting them would swallow a cancel of the caller that lands
        # meanwhile, and the caller would wait on forever
        sleeper.cancel()
        waiter.cancel()


class SystemClock:
    """The real clock."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock that moves only when told to; sleepers wake when it passes their deadline."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._t = 0.0
        self._epoch = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._epoch + self._t

    def monotonic(self) -> float:
        return self._t

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._t + seconds, next(self._seq), fut))
        await fut

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking every sleeper whose deadline passes, in order."""
        target = self._t + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, fut = heapq.heappop(self._sleepers)
            self._t = max(self._t, deadline)
            if not fut.done():
                fut.set_result(None)
            # let the woken task run before the next deadline fires
            for _ in range(5):
                await asyncio.sleep(0)
        self._t = target
        for _ in range(5):
            await asyncio.sleep(0)

    @property
    def sleepers(self) -> int:
        return sum(1 for _, _, f in self._sleepers if not f.done())
