"""Samples sent beside the work they describe: progress, never a log."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from .clock import Clock, SystemClock

T = TypeVar("T")
log = logging.getLogger(__name__)


class LatestSender(Generic[T]):
    """Send what is offered, one at a time, without making the offerer wait.

    While one item is on its way, or until ``interval_s`` has passed since the last one went,
    the newest offered waits, replacing any older one: a slow broker or a fast migration gets
    fewer items, never a queue of stale ones, and whoever offers (a saga's step, a driver's
    watch over a migration) goes on at once. An exception out of ``send`` is logged and ends
    only that item.
    """

    def __init__(self, send: Callable[[T], Awaitable[None]], *, interval_s: float = 0.0,
                 clock: Clock | None = None) -> None:
        self._send = send
        self.interval_s = interval_s
        self._clock = clock or SystemClock()
        self._next: T | None = None
        self._task: asyncio.Task[None] | None = None
        self._last: float | None = None  # when the last item went, on this clock's monotonic time
        self._sending = False

    def sent_now(self) -> None:
        """Count the interval from now, as if an item had just gone (one sent elsewhere)."""
        self._last = self._clock.monotonic()

    def offer(self, item: T) -> None:
        """Send ``item`` once the one on its way has gone and ``interval_s`` has passed since
        it went (or instead of one waiting)."""
        self._next = item
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    def drop(self) -> None:
        """Forget the item still waiting, if any (the one on its way goes on)."""
        self._next = None
        if self._task is not None and not self._sending:
            self._task.cancel()  # it only waits for the interval to pass

    async def flush(self) -> None:
        """Return once nothing offered is still waiting or on its way."""
        task, self._task = self._task, None
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while self._next is not None:
            if self.interval_s > 0 and self._last is not None:
                wait = self._last + self.interval_s - self._clock.monotonic()
                if wait > 0:
                    await self._clock.sleep(wait)
                    continue  # a newer item may have replaced it, or none be left
            item, self._next = self._next, None
            self._last = self._clock.monotonic()
            self._sending = True
            try:
                await self._send(item)
            except Exception:
                log.warning("a sample was not sent", exc_info=True)
            finally:
                self._sending = False
