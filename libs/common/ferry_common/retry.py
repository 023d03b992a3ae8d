"""Retry policies as values, run by tenacity on an injectable clock.

A policy says how often to try and how long to wait between tries; what is retried (which
errors) and what happens before each wait (recording it) belong to the caller.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_never,
    wait_exponential,
    wait_incrementing,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from .clock import Clock
from .errors import is_retryable

T = TypeVar("T")
#: told before each wait: the retry's number (1 for the first) and the error that caused it
OnRetry = Callable[[int, BaseException], Awaitable[None]]


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all (None: until it works); the wait before retry ``n`` is
    ``backoff_s * n`` (linear) or ``backoff_s * 2**(n-1)`` (exponential), at most ``max_s``."""

    attempts: int | None
    backoff_s: float
    max_s: float
    growth: Literal["linear", "exponential"] = "linear"

    def delay(self, retry: int) -> float:
        """The wait before retry number ``retry`` (1 for the first)."""
        n = max(1, retry)
        grown = self.backoff_s * n if self.growth == "linear" else self.backoff_s * 2 ** (n - 1)
        return max(0.0, min(self.max_s, grown))

    def _wait_after(self, first_retry: int) -> wait_base:
        """Tenacity's wait for its attempt ``j``: the delay of retry ``first_retry + j``."""
        if self.growth == "linear":
            return wait_incrementing(start=self.backoff_s * (first_retry + 1), increment=self.backoff_s, max=self.max_s)
        return wait_exponential(multiplier=self.backoff_s * 2**first_retry, exp_base=2, max=self.max_s)

    def _stop_after_first(self) -> stop_base:
        return stop_never if self.attempts is None else stop_after_attempt(self.attempts - 1)

    async def run(
        self,
        fn: Callable[[], Awaitable[T]],
        clock: Clock,
        *,
        retry_on: Callable[[BaseException], bool] = is_retryable,
        on_retry: OnRetry | None = None,
        first_retry: int = 1,
    ) -> T:
        """``await fn()`` until it returns, raises what ``retry_on`` refuses, or the attempts
        run out (the last error is raised as it was).

        ``first_retry`` numbers the first retry: a count kept across restarts continues, and
        so do its waits. The first try runs bare, tenacity runs the retries: most calls need
        none, and a controller per call costs the control plane's busiest path."""
        try:
            return await fn()
        except Exception as exc:
            if self.attempts == 1 or not retry_on(exc):
                raise
            if on_retry is not None:
                await on_retry(first_retry, exc)
        await clock.sleep(self.delay(first_retry))

        async def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            if on_retry is not None and exc is not None:
                await on_retry(first_retry + state.attempt_number, exc)

        async for attempt in AsyncRetrying(
            stop=self._stop_after_first(),
            wait=self._wait_after(first_retry),
            retry=retry_if_exception(retry_on),
            sleep=clock.sleep,
            before_sleep=before_sleep,
            reraise=True,
        ):
            with attempt:
                return await fn()
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover
