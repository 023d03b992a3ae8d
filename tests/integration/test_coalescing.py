"""Coalescing on the real RabbitMQ: internal messages published at once to one key travel as
batches, and every one of them is still delivered, settled and dead-lettered on its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aio_pika
import orjson
import pytest

from ferry_common import metrics
from ferry_common.bus.amqp import AmqpBus
from ferry_common.bus.batch import BATCH_TYPE, pack
from ferry_common.bus.interfaces import Delivery, Message, QueueSpec
from ferry_common.bus.topology import DEAD_LETTER_QUEUE, DELIVERY_LIMIT, EXCHANGE, REASON_HEADER
from ferry_common.errors import Unroutable
from tests.harness import amqp_url, drop_vhost, make_vhost, metric_sample

pytestmark = [pytest.mark.rabbitmq, pytest.mark.usefixtures("rabbitmq_available")]
KEY = "host.h1.sensor"


@pytest.fixture
async def buses() -> AsyncIterator[tuple[AmqpBus, AmqpBus, str]]:
    vhost = make_vhost()
    sender, receiver = AmqpBus(amqp_url(vhost), coalesce=True), AmqpBus(amqp_url(vhost), coalesce=True)
    await sender.connect()
    await receiver.connect()
    yield sender, receiver, vhost
    await sender.close()
    await receiver.close()
    drop_vhost(vhost)


def message(i: int, key: str = KEY) -> Message:
    return Message(routing_key=key, body=orjson.dumps({"n": i}), type="Inspect", headers={"x-test": str(i)})


async def dead_letters(bus: AmqpBus, want: int, timeout: float = 10.0) -> list[Delivery]:
    got: list[Delivery] = []
    done = asyncio.Event()

    async def take(d: Delivery) -> None:
        got.append(d)
        await d.ack()
        if len(got) >= want:
            done.set()

    consumer = await bus.consume(QueueSpec(DEAD_LETTER_QUEUE), take)
    try:
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        await consumer.cancel()
    return got


async def test_messages_published_at_once_arrive_once_each_in_order_in_fewer_amqp_messages(
        buses: tuple[AmqpBus, AmqpBus, str]) -> None:
    sender, receiver, _ = buses
    seen: list[int] = []
    done = asyncio.Event()

    async def handle(d: Delivery) -> None:
        seen.append(orjson.loads(d.message.body)["n"])  # before any await: delivery order
        assert d.message.routing_key == KEY and d.message.headers["x-test"] == str(seen[-1])
        await d.ack()
        if len(seen) == 500:
            done.set()

    await receiver.consume(QueueSpec("ferry.h1.sensor", (KEY,)), handle)
    before = sender.amqp_published
    exported = metrics.REGISTRY.render()
    await asyncio.gather(*(sender.publish(message(i)) for i in range(500)))
    await asyncio.wait_for(done.wait(), 20)
    await asyncio.sleep(0.2)  # nothing more comes
    assert seen == list(range(500))
    assert sender.amqp_published - before < 100
    assert sender.coalescing is not None and sender.coalescing.batches >= 2
    # what /metrics shows: the AMQP messages, and the messages that went in batches
    grew = {name: metric_sample(metrics.REGISTRY.render(), name) - metric_sample(exported, name)
            for name in ("ferry_amqp_published_total", "ferry_amqp_coalesced_total")}
    assert grew["ferry_amqp_published_total"] == sender.amqp_published - before
    assert 400 < grew["ferry_amqp_coalesced_total"] < 500


async def test_a_message_sent_back_is_redelivered_alone(buses: tuple[AmqpBus, AmqpBus, str]) -> None:
    sender, receiver, _ = buses
    deliveries: list[tuple[int, int, bool]] = []
    done = asyncio.Event()

    async def handle(d: Delivery) -> None:
        n = orjson.loads(d.message.body)["n"]
        deliveries.append((n, d.delivery_count, d.redelivered))
        if n == 7 and d.delivery_count == 1:
            await d.nack(requeue=True)
        else:
            await d.ack()
        if len(deliveries) == 51:
            done.set()

    await receiver.consume(QueueSpec("ferry.h1.sensor", (KEY,)), handle)
    await asyncio.gather(*(sender.publish(message(i)) for i in range(50)))
    await asyncio.wait_for(done.wait(), 20)
    await asyncio.sleep(0.3)
    assert sorted(n for n, _, _ in deliveries) == sorted([*range(50), 7])
    assert [(c, r) for n, c, r in deliveries if n == 7] == [(1, False), (2, True)]
    assert sender.coalescing is not None and sender.coalescing.batches >= 1


async def test_a_message_failing_every_time_is_dead_lettered_with_the_reason_and_the_rest_go_on(
        buses: tuple[AmqpBus, AmqpBus, str]) -> None:
    sender, receiver, _ = buses
    counts: dict[int, int] = {}

    async def handle(d: Delivery) -> None:
        n = orjson.loads(d.message.body)["n"]
        counts[n] = counts.get(n, 0) + 1
        if n == 3:
            raise RuntimeError("a handler that always fails")
        await d.ack()

    await receiver.consume(QueueSpec("ferry.h1.sensor", (KEY,)), handle)
    await asyncio.gather(*(sender.publish(message(i)) for i in range(30)))
    [dead] = await dead_letters(receiver, 1)
    assert orjson.loads(dead.message.body) == {"n": 3}
    assert dead.message.headers[REASON_HEADER] == f"delivery limit of {DELIVERY_LIMIT} reached"
    assert counts[3] == DELIVERY_LIMIT
    assert all(counts[i] == 1 for i in range(30) if i != 3)


async def test_a_malformed_batch_is_dead_lettered_and_the_consumer_goes_on(buses: tuple[AmqpBus, AmqpBus, str]) -> None:
    sender, receiver, vhost = buses
    handled: list[int] = []

    async def handle(d: Delivery) -> None:
        handled.append(orjson.loads(d.message.body)["n"])
        await d.ack()

    await receiver.consume(QueueSpec("ferry.h1.sensor", (KEY,)), handle)
    conn = await aio_pika.connect(amqp_url(vhost))
    try:
        ch = await conn.channel()
        ex = await ch.get_exchange(EXCHANGE)
        await ex.publish(aio_pika.Message(b"\x00\x00\x00\x09not json!", type=BATCH_TYPE), KEY)
    finally:
        await conn.close()
    await sender.publish(message(1))
    [dead] = await dead_letters(receiver, 1)
    assert dead.message.headers[REASON_HEADER].startswith("malformed batch")
    for _ in range(100):
        if handled:
            break
        await asyncio.sleep(0.05)
    assert handled == [1]


async def test_a_batch_carrying_a_command_for_another_host_is_refused_whole(
        buses: tuple[AmqpBus, AmqpBus, str]) -> None:
    _, receiver, vhost = buses
    handled: list[Delivery] = []

    async def handle(d: Delivery) -> None:
        handled.append(d)
        await d.ack()

    await receiver.consume(QueueSpec("ferry.h1.sensor", (KEY,)), handle)
    smuggled = pack([message(1), message(2, key="host.h2.sensor")])
    conn = await aio_pika.connect(amqp_url(vhost))
    try:
        ch = await conn.channel()
        await (await ch.get_exchange(EXCHANGE)).publish(aio_pika.Message(smuggled, type=BATCH_TYPE), KEY)
    finally:
        await conn.close()
    [dead] = await dead_letters(receiver, 1)
    assert "another routing key" in dead.message.headers[REASON_HEADER]
    assert handled == []


async def test_a_batch_nobody_takes_fails_every_publisher(buses: tuple[AmqpBus, AmqpBus, str]) -> None:
    sender, _, _ = buses
    results = await asyncio.gather(*(sender.publish(message(i, key="host.nobody.sensor")) for i in range(40)),
                                   return_exceptions=True)
    assert all(isinstance(r, Unroutable) for r in results), results


async def test_public_keys_go_one_message_per_event(buses: tuple[AmqpBus, AmqpBus, str]) -> None:
    sender, _, vhost = buses
    conn = await aio_pika.connect(amqp_url(vhost))
    try:
        ch = await conn.channel()
        q = await ch.declare_queue(exclusive=True)
        await q.bind(await ch.get_exchange(EXCHANGE), "migration.progress")
        await asyncio.gather(*(sender.publish(message(i, key="migration.progress")) for i in range(40)))
        got = []
        async with q.iterator() as it:
            async for m in it:
                await m.ack()
                got.append((m.type, orjson.loads(m.body)["n"]))
                if len(got) == 40:
                    break
    finally:
        await conn.close()
    assert got == [("Inspect", i) for i in range(40)]
