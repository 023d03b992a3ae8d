"""Coalescing without a broker: the batch body's framing and the lanes' ordering and errors."""

from __future__ import annotations

import asyncio

import pytest

from ferry_common.bus.batch import MAX_ITEM_BYTES, MAX_ITEMS, Lanes, batchable, pack, unpack
from ferry_common.bus.interfaces import Message
from ferry_common.errors import InvalidMessage, Transient, Unroutable


def msg(i: int, key: str = "host.a.sensor", body: bytes | None = None) -> Message:
    return Message(routing_key=key, body=body if body is not None else b'{"n":%d}' % i, type="Inspect",
                   correlation_id=f"c{i}" if i % 2 else None, reply_to="reply.x" if i % 3 else None,
                   headers={"x-ferry-sender": "host/a/sensor", "sig": f"s{i}"}, timestamp=1000.0 + i)


def test_a_batch_body_gives_back_every_message_exactly() -> None:
    sent = [msg(i) for i in range(20)] + [msg(99, body=b"")]
    assert unpack(pack(sent)) == sent


@pytest.mark.parametrize("body", [b"", b"\x00\x00", b"\x00\x00\x00\x05{}", b"\x00\x00\x00\x02{}\x00\x00\x00\x09ab",
                                  b"\x00\x00\x00\x02[]\x00\x00\x00\x00", b"\x00\x00\x00\x0c{\"h\":{\"a\":1}}"])
def test_a_malformed_batch_is_refused_with_a_reason(body: bytes) -> None:
    with pytest.raises(InvalidMessage) as err:
        unpack(body)
    assert err.value.reason


def test_only_internal_keys_are_coalesced() -> None:
    assert all(batchable(k) for k in ("host.a.sensor", "reply.coordinator.x"))
    assert not any(batchable(k) for k in ("migration.progress", "migration.requested", "vm.v1.event", "alarm.v1",
                                          "inventory.a"))


class FakeSend:
    """Records what was sent, as batches; each send waits until released."""

    def __init__(self) -> None:
        self.sent: list[list[Message]] = []
        self.gate = asyncio.Event()
        self.fail: Exception | None = None

    async def __call__(self, messages: list[Message]) -> None:
        self.sent.append(messages)
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail


async def test_a_message_alone_goes_at_once_and_the_rest_queue_behind_it_in_order() -> None:
    send = FakeSend()
    lanes = Lanes(send)
    first = asyncio.create_task(lanes.publish(msg(0)))
    await asyncio.sleep(0)
    assert [len(b) for b in send.sent] == [1]  # nothing waits for company
    rest = [asyncio.create_task(lanes.publish(msg(i))) for i in range(1, 600)]
    await asyncio.sleep(0)
    send.gate.set()
    await asyncio.gather(first, *rest)
    assert [m.body for b in send.sent for m in b] == [msg(i).body for i in range(600)]
    assert [len(b) for b in send.sent] == [1, MAX_ITEMS, MAX_ITEMS, 599 - 2 * MAX_ITEMS]
    assert lanes.batches == 3 and lanes.coalesced == 599
    assert lanes._lanes == {}  # an idle lane is not kept (reply keys come and go)


async def test_keys_have_lanes_of_their_own() -> None:
    send = FakeSend()
    lanes = Lanes(send)
    tasks = [asyncio.create_task(lanes.publish(msg(i, key=f"host.{i % 2}.sensor"))) for i in range(6)]
    await asyncio.sleep(0)
    assert [b[0].routing_key for b in send.sent] == ["host.0.sensor", "host.1.sensor"]
    send.gate.set()
    await asyncio.gather(*tasks)
    assert all(len({m.routing_key for m in b}) == 1 for b in send.sent)


async def test_a_large_message_goes_alone_in_its_turn() -> None:
    send = FakeSend()
    lanes = Lanes(send)
    big = msg(2, body=b"x" * (MAX_ITEM_BYTES + 1))
    tasks = [asyncio.create_task(lanes.publish(m)) for m in (msg(0), msg(1), big, msg(3), msg(4))]
    await asyncio.sleep(0)
    send.gate.set()
    await asyncio.gather(*tasks)
    assert [[m.body[:8] for m in b] for b in send.sent] == [
        [msg(0).body], [msg(1).body], [big.body[:8]], [msg(3).body, msg(4).body]]


@pytest.mark.parametrize("error", [Unroutable("no queue"), Transient("connection lost")])
async def test_a_failed_batch_fails_every_publisher_in_it(error: Exception) -> None:
    send = FakeSend()
    lanes = Lanes(send)
    tasks = [asyncio.create_task(lanes.publish(msg(i))) for i in range(10)]
    await asyncio.sleep(0)
    send.fail = error
    send.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, type(error)) for r in results)
    # the lane is free again: the next message goes at once
    send.fail = None
    last = msg(11)
    await lanes.publish(last)
    assert send.sent[-1] == [last]
