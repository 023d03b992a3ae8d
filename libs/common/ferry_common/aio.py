"""Small asyncio helpers the services share."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .errors import FerryError


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel each task (None and finished ones are skipped) and wait until it has ended, so
    nothing it holds outlives the caller's shutdown; its cancellation is not re-raised."""
    for task in tasks:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def one_pass(step: Callable[[], Awaitable[Any]], log: logging.Logger, what: str) -> None:
    """One pass of a service's loop, which goes on whatever the pass raised: a FerryError is
    logged with its reason, anything else with its traceback."""
    try:
        await step()
    except asyncio.CancelledError:
        raise
    except FerryError as exc:
        log.warning("%s: %s", what, exc.reason)
    except Exception:
        log.exception("%s failed", what)
