"""The bus contract: the in-process broker and RabbitMQ run these unchanged.

Topic routing, mandatory publishing, manual acks, redelivery, the delivery limit and the
dead-letter queue, dynamic bindings, and the endpoint's acknowledgement policy on top.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from ferry_common.bus.amqp import AmqpBus
from ferry_common.bus.interfaces import Bus, Delivery, Message, QueueSpec
from ferry_common.bus.memory import MemoryBus
from ferry_common.bus.topology import DEAD_LETTER_QUEUE, DELIVERY_LIMIT, REASON_HEADER
from ferry_common.endpoint import Context, Endpoint, Forward, Router
from ferry_common.errors import InvalidMessage, RemoteError, Transient, Unroutable
from ferry_common.messages.commands import Done, Inspect
from tests.harness import amqp_url, drop_vhost, make_vhost


@pytest.fixture
async def bus(bus_kind: str) -> AsyncIterator[Bus]:
    if bus_kind == "memory":
        b: Bus = MemoryBus()
        await b.connect()
        yield b
        await b.close()
        return
    vhost = make_vhost()
    b = AmqpBus(amqp_url(vhost))
    await b.connect()
    yield b
    await b.close()
    drop_vhost(vhost)


def msg(key: str, body: bytes = b"{}", **kw: object) -> Message:
    return Message(routing_key=key, body=body, **kw)  # type: ignore[arg-type]


async def collect(bus: Bus, name: str, bindings: tuple[str, ...], *, ack: bool = True) -> asyncio.Queue[Delivery]:
    got: asyncio.Queue[Delivery] = asyncio.Queue()

    async def handler(d: Delivery) -> None:
        if ack:
            await d.ack()
        got.put_nowait(d)

    await bus.consume(QueueSpec(name, bindings), handler)
    return got


async def dead_letters(bus: Bus, n: int) -> list[Message]:
    """The first ``n`` messages of the dead-letter queue."""
    if isinstance(bus, MemoryBus):
        for _ in range(200):
            if len(bus.dead_letters) >= n:
                break
            await asyncio.sleep(0.01)
        return bus.dead_letters[:n]
    got = await collect(bus, DEAD_LETTER_QUEUE, ())
    return [(await asyncio.wait_for(got.get(), 10)).message for _ in range(n)]


async def test_topic_routing_and_properties(bus: Bus) -> None:
    got = await collect(bus, f"q.{uuid.uuid4().hex[:6]}", ("vm.*.event", "host.a.#"))
    await bus.publish(msg("vm.v1.event", b'{"a": 1}', type="VmEvent", correlation_id="c1", headers={"h": "x"}))
    await bus.publish(msg("host.a.sensor.x"))
    first = (await asyncio.wait_for(got.get(), 5)).message
    second = (await asyncio.wait_for(got.get(), 5)).message
    assert (first.body, first.type, first.correlation_id, first.headers.get("h")) == (b'{"a": 1}', "VmEvent", "c1", "x")
    assert second.routing_key == "host.a.sensor.x"


async def test_an_unroutable_message_is_an_error(bus: Bus) -> None:
    with pytest.raises(Unroutable):
        await bus.publish(msg("nobody.listens.here"))


async def test_an_announcement_nobody_takes_is_dropped_and_one_somebody_takes_arrives(bus: Bus) -> None:
    await bus.publish(msg("migration.progress"), mandatory=False)  # no error: nobody listens
    got = await collect(bus, f"q.{uuid.uuid4().hex[:6]}", ("migration.*",))
    await bus.publish(msg("migration.progress", b'{"n": 2}'), mandatory=False)
    assert (await asyncio.wait_for(got.get(), 5)).message.body == b'{"n": 2}'
    await asyncio.sleep(0.1)
    assert got.empty()  # the first one was dropped, not kept for a later listener


async def test_nack_redelivers_and_the_delivery_limit_dead_letters(bus: Bus) -> None:
    name = f"q.{uuid.uuid4().hex[:6]}"
    counts: list[int] = []

    async def handler(d: Delivery) -> None:
        counts.append(d.delivery_count)
        await d.nack(requeue=True)

    await bus.consume(QueueSpec(name, ("poison.#",)), handler)
    await bus.publish(msg("poison.pill"))
    [dead] = await dead_letters(bus, 1)
    assert dead.routing_key == "poison.pill"
    assert counts[0] == 1 and counts[-1] >= DELIVERY_LIMIT - 1
    assert any(c > 1 for c in counts)


async def test_unacked_deliveries_come_back_after_the_consumer_goes(bus: Bus) -> None:
    name = f"q.{uuid.uuid4().hex[:6]}"
    held = await collect(bus, name, ("hold.#",), ack=False)
    await bus.publish(msg("hold.me"))
    first = await asyncio.wait_for(held.get(), 5)
    assert not first.redelivered
    if isinstance(bus, MemoryBus):
        await bus.queues[name].consumer.cancel()  # type: ignore[union-attr]
    else:
        await bus._consumers[name].cancel()
    again = await collect(bus, name, ())
    second = await asyncio.wait_for(again.get(), 10)
    assert second.redelivered and second.message.message_id == first.message.message_id


async def test_bind_unbind_and_purge(bus: Bus) -> None:
    name = f"q.{uuid.uuid4().hex[:6]}"
    got = await collect(bus, name, ("base.key",))
    await bus.bind(name, "vm.v9.event")
    await bus.publish(msg("vm.v9.event"))
    assert (await asyncio.wait_for(got.get(), 5)).message.routing_key == "vm.v9.event"
    await bus.unbind(name, "vm.v9.event")
    with pytest.raises(Unroutable):
        await bus.publish(msg("vm.v9.event"))


async def test_endpoint_acknowledgement_policy(bus: Bus) -> None:
    """Reply on success; dead-letter with the reason and tell the sender on a refusal;
    dead-letter an unexpected error too; the service keeps serving."""
    server, client = Endpoint(bus, "host/h/test"), Endpoint(bus, "client/t")
    router = Router()
    calls = {"n": 0}

    async def inspect(m: Inspect, ctx: Context) -> Done:
        calls["n"] += 1
        if m.vm_id == "refuse":
            raise InvalidMessage("no such vm")
        if m.vm_id == "bug":
            raise ZeroDivisionError("oops")
        if m.vm_id == "flaky" and calls["n"] < 3:
            raise Transient("try again")
        return Done(detail={"vm": m.vm_id})

    router.add(Inspect, inspect)
    key = f"host.h{uuid.uuid4().hex[:4]}.test"
    await server.serve(QueueSpec(f"ferry.{key}", (key,)), router)
    ok = await client.request(key, Inspect(vm_id="v1"), timeout=5)
    assert ok == Done(detail={"vm": "v1"})
    with pytest.raises(RemoteError) as refused:
        await client.request(key, Inspect(vm_id="refuse"), timeout=5)
    assert refused.value.code == "invalid_message" and "no such vm" in refused.value.reason
    with pytest.raises(RemoteError) as bug:
        await client.request(key, Inspect(vm_id="bug"), timeout=5)
    assert bug.value.code == "internal"
    calls["n"] = 0
    assert await client.request(key, Inspect(vm_id="flaky"), timeout=10) == Done(detail={"vm": "flaky"})
    dead = await dead_letters(bus, 2)
    assert [d.headers[REASON_HEADER] for d in dead][0] == "no such vm"
    assert "ZeroDivisionError" in dead[1].headers[REASON_HEADER]
    await client.close()
    await server.close()


async def test_a_forwarded_request_is_answered_by_the_next_service(bus: Bus) -> None:
    """A handler that returns ``Forward`` passes the request on and is done with it; the
    next service answers the original requester, refusals included; nothing routable for
    the forward is an error reply, not a silent loss."""
    first, second, client = Endpoint(bus, "host/a/test"), Endpoint(bus, "host/b/test"), Endpoint(bus, "client/t")
    tag = uuid.uuid4().hex[:4]
    key_a, key_b = f"host.a{tag}.test", f"host.b{tag}.test"
    forwarded: list[str] = []

    async def relay(m: Inspect, ctx: Context) -> Forward:
        forwarded.append(m.vm_id or "")
        to = f"host.nowhere{tag}.test" if m.vm_id == "lost" else key_b
        return Forward(to, Inspect(vm_id=f"{m.vm_id}-via-a"))

    async def answer(m: Inspect, ctx: Context) -> Done:
        if m.vm_id == "refuse-via-a":
            raise InvalidMessage("b refuses")
        return Done(detail={"vm": m.vm_id, "sender": ctx.sender})

    ra, rb = Router(), Router()
    ra.add(Inspect, relay)
    rb.add(Inspect, answer)
    await first.serve(QueueSpec(f"ferry.{key_a}", (key_a,)), ra)
    await second.serve(QueueSpec(f"ferry.{key_b}", (key_b,)), rb)

    got = await client.request(key_a, Inspect(vm_id="v1"), timeout=5)
    assert got == Done(detail={"vm": "v1-via-a", "sender": "host/a/test"})
    with pytest.raises(RemoteError) as refused:
        await client.request(key_a, Inspect(vm_id="refuse"), timeout=5)
    assert "b refuses" in refused.value.reason
    with pytest.raises(RemoteError) as lost:
        await client.request(key_a, Inspect(vm_id="lost"), timeout=5)
    assert lost.value.code == "unroutable", lost.value
    assert forwarded == ["v1", "refuse", "lost"]
    for e in (client, first, second):
        await e.close()
