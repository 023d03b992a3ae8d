"""Retry policies as values, run by tenacity on an injected clock."""

from __future__ import annotations

import pytest

from ferry_common.errors import FailedOnHost, TimedOut, Unreachable
from ferry_common.retry import RetryPolicy

from .saga_fakes import InstantClock


def test_delays_grow_as_declared_and_stop_at_the_bound() -> None:
    linear = RetryPolicy(attempts=None, backoff_s=1.0, max_s=3.5)
    exponential = RetryPolicy(attempts=None, backoff_s=0.5, max_s=5.0, growth="exponential")
    assert [linear.delay(n) for n in range(1, 6)] == [1.0, 2.0, 3.0, 3.5, 3.5]
    assert [exponential.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 5.0]


@pytest.mark.parametrize("growth", ["linear", "exponential"])
async def test_retryable_errors_are_tried_again_with_the_policys_waits(growth: str) -> None:
    policy = RetryPolicy(attempts=4, backoff_s=0.1, max_s=10.0, growth=growth)  # type: ignore[arg-type]
    clock, seen = InstantClock(), []
    failures: list[Exception] = [TimedOut("lost"), TimedOut("lost"), TimedOut("lost")]
    tries: list[int] = []

    async def call() -> str:
        tries.append(1)
        if failures:
            raise failures.pop(0)
        return "ok"

    async def on_retry(n: int, exc: BaseException) -> None:
        seen.append(n)

    assert await policy.run(call, clock, on_retry=on_retry) == "ok"
    assert len(tries) == 4 and seen == [1, 2, 3]
    assert clock.slept == pytest.approx([policy.delay(n) for n in (1, 2, 3)])


async def test_the_last_error_is_raised_when_the_attempts_run_out() -> None:
    clock = InstantClock()
    tries: list[int] = []

    async def call() -> str:
        tries.append(1)
        raise TimedOut(f"lost {len(tries)}")

    with pytest.raises(TimedOut, match="lost 2"):
        await RetryPolicy(attempts=2, backoff_s=0.05, max_s=1.0).run(call, clock)
    assert len(tries) == 2 and clock.slept == [0.05]


@pytest.mark.parametrize("error", [Unreachable("gone"), FailedOnHost("no", code="bad")])
async def test_what_is_not_retryable_is_raised_at_once(error: Exception) -> None:
    clock = InstantClock()
    tries: list[int] = []

    async def call() -> str:
        tries.append(1)
        raise error

    with pytest.raises(type(error)):
        await RetryPolicy(attempts=5, backoff_s=0.05, max_s=1.0).run(call, clock)
    assert len(tries) == 1 and clock.slept == []


async def test_a_count_kept_across_restarts_continues_its_waits() -> None:
    clock = InstantClock()
    failures = [TimedOut("x"), TimedOut("x")]
    numbers: list[int] = []

    async def call() -> str:
        if failures:
            raise failures.pop(0)
        return "ok"

    async def on_retry(n: int, exc: BaseException) -> None:
        numbers.append(n)

    policy = RetryPolicy(attempts=None, backoff_s=1.0, max_s=100.0, growth="exponential")
    await policy.run(call, clock, on_retry=on_retry, first_retry=3)
    assert numbers == [3, 4] and clock.slept == [4.0, 8.0]
