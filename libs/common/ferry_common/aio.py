"""Small asyncio helpers the services share."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel each task (None and finished ones are skipped) and wait until it has ended, so
    nothing it holds outlives the caller's shutdown; its cancellation is not re-raised."""
    for task in tasks:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
