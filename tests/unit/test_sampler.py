"""LatestSender: samples go beside the work, in order, the newest replacing a waiting one."""

from __future__ import annotations

import asyncio

import pytest

from ferry_common.clock import FakeClock
from ferry_common.sampler import LatestSender


class Gate:
    """A send that records what it got and waits until released."""

    def __init__(self, fail_on: set[int] | None = None) -> None:
        self.sent: list[int] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.fail_on = fail_on or set()

    async def send(self, item: int) -> None:
        self.started.set()
        await self.release.wait()
        if item in self.fail_on:
            raise RuntimeError(f"broker said no to {item}")
        self.sent.append(item)


async def test_offer_returns_at_once_and_the_newest_replaces_a_waiting_one() -> None:
    gate = Gate()
    sender: LatestSender[int] = LatestSender(gate.send)
    sender.offer(1)
    await gate.started.wait()  # 1 is on its way, held by the broker
    for i in range(2, 10):
        sender.offer(i)  # none of these waits
    gate.release.set()
    await sender.flush()
    assert gate.sent == [1, 9]


async def test_every_item_goes_when_the_broker_keeps_up() -> None:
    gate = Gate()
    gate.release.set()
    sender: LatestSender[int] = LatestSender(gate.send)
    for i in range(5):
        sender.offer(i)
        await sender.flush()
    assert gate.sent == [0, 1, 2, 3, 4]


async def test_drop_forgets_the_waiting_item_and_flush_waits_for_the_one_on_its_way() -> None:
    gate = Gate()
    sender: LatestSender[int] = LatestSender(gate.send)
    sender.offer(1)
    await gate.started.wait()
    sender.offer(2)
    sender.drop()
    flushed = asyncio.create_task(sender.flush())
    await asyncio.sleep(0.01)
    assert not flushed.done(), "flush returned while an item was still on its way"
    gate.release.set()
    await flushed
    assert gate.sent == [1]


async def test_a_failed_send_ends_only_its_item(caplog: pytest.LogCaptureFixture) -> None:
    gate = Gate(fail_on={1})
    sender: LatestSender[int] = LatestSender(gate.send)
    sender.offer(1)
    await gate.started.wait()
    sender.offer(2)  # offered while the failing one is on its way: still goes
    gate.release.set()
    await sender.flush()
    sender.offer(3)
    await sender.flush()
    assert gate.sent == [2, 3]
    assert "not sent" in caplog.text


async def test_flush_with_nothing_offered_returns() -> None:
    sender: LatestSender[int] = LatestSender(Gate().send)
    await asyncio.wait_for(sender.flush(), 1.0)


async def test_with_an_interval_the_newest_goes_once_it_has_passed() -> None:
    clock = FakeClock()
    gate = Gate()
    gate.release.set()
    sender: LatestSender[int] = LatestSender(gate.send, interval_s=1.0, clock=clock)
    sender.offer(1)
    await sender.flush()  # nothing went before: at once
    for i in range(2, 6):
        sender.offer(i)
        await clock.advance(0.1)
    assert gate.sent == [1], "an item went before the interval had passed"
    await clock.advance(0.6)  # 1.0 s after the first
    await sender.flush()
    assert gate.sent == [1, 5]


async def test_sent_now_starts_the_interval_and_drop_ends_the_wait_at_once() -> None:
    clock = FakeClock()
    gate = Gate()
    gate.release.set()
    sender: LatestSender[int] = LatestSender(gate.send, interval_s=1.0, clock=clock)
    sender.sent_now()  # as if one had gone elsewhere (a saga's `accepted`)
    sender.offer(1)
    await clock.advance(0.5)
    assert gate.sent == []
    sender.drop()  # an outcome supersedes it: no waiting out the interval
    await asyncio.wait_for(sender.flush(), 1.0)
    await clock.advance(2.0)
    assert gate.sent == []
