"""Samples sent beside the work they describe: progress, never a log."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class LatestSender(Generic[T]):
    """Send what is offered, one at a time, without making the offerer wait.

    While one item is on its way the newest offered waits, replacing any older one: a slow
    broker gets fewer items, never a queue of stale ones, and whoever offers (a saga's step,
    a driver's watch over a migration) goes on at once. An exception out of ``send`` is
    logged and ends only that item.
    """

    def __init__(self, send: Callable[[T], Awaitable[None]]) -> None:
        self._send = send
        self._next: T | None = None
        self._task: asyncio.Task[None] | None = None

    def offer(self, item: T) -> None:
        """Send ``item`` as soon as the one on its way has gone (or instead of one waiting)."""
        self._next = item
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    def drop(self) -> None:
        """Forget the item still waiting, if any (the one on its way goes on)."""
        self._next = None

    async def flush(self) -> None:
        """Return once nothing offered is still waiting or on its way."""
        task, self._task = self._task, None
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while self._next is not None:
            item, self._next = self._next, None
            try:
                await self._send(item)
            except Exception:
                log.warning("a sample was not sent", exc_info=True)
