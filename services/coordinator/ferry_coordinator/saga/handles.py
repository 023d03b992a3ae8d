"""Work a step starts in the background and a later step joins (or the compensation settles)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Background(Generic[T]):
    """One named piece of work that runs beside the steps: started at most once, then
    joined by the step that needs its answer, or settled by the compensation."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._task: asyncio.Task[T] | None = None

    @property
    def begun(self) -> bool:
        return self._task is not None

    def start(self, work: Callable[[], Awaitable[T]]) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(work())
            self._task.set_name(self.name)

    def take(self) -> asyncio.Task[T] | None:
        """The running work, handed to whoever joins it (once)."""
        task, self._task = self._task, None
        return task

    async def settle(self) -> None:
        """Let the work end (answered or failed) before cleaning up after it."""
        task = self.take()
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
