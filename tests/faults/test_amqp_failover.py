"""AmqpBus over two addresses of the real broker, each through a fault proxy: the first is down
at connect time, then the one in use goes away; the bus carries on through the other."""

from __future__ import annotations

import asyncio

import pytest

from ferry_common.bus.amqp import AmqpBus
from ferry_common.bus.interfaces import Delivery, Message, QueueSpec
from tests.faults.proxy import FaultProxy
from tests.harness import drop_vhost, make_vhost

pytestmark = pytest.mark.rabbitmq


async def test_bus_fails_over_to_the_next_address(rabbitmq_available: None) -> None:
    vhost = make_vhost()
    p1, p2 = FaultProxy(), FaultProxy()
    await p1.start()
    await p2.start()
    got: asyncio.Queue[str] = asyncio.Queue()

    async def handler(d: Delivery) -> None:
        await got.put(d.message.body.decode())
        await d.ack()

    bus = AmqpBus(f"{p1.url(vhost)}?reconnect_interval=0.2,{p2.url(vhost)}?reconnect_interval=0.2", name="failover-test")
    try:
        await p1.close()  # node 1 is down when the bus starts
        await bus.connect()
        assert bus._conn is not None and bus._conn.url.port == p2.listen_port
        spec = QueueSpec(name="failover-q", bindings=("failover.#",))
        await bus.consume(spec, handler)
        await bus.publish(Message(routing_key="failover.x", body=b"one", type="T", message_id="m1"))
        assert await asyncio.wait_for(got.get(), 10) == "one"
        p1 = FaultProxy(listen_port=p1.listen_port)  # node 1 back, node 2 gone
        await p1.start()
        await p2.close()
        for _ in range(100):
            if bus._conn.connected.is_set() and bus._conn.url.port == p1.listen_port:
                break
            await asyncio.sleep(0.1)
        assert bus._conn.url.port == p1.listen_port, "the bus did not move to the other address"
        for _ in range(50):  # the robust connection restores the consumer, then publishing works
            try:
                await bus.publish(Message(routing_key="failover.x", body=b"two", type="T", message_id="m2"))
                break
            except Exception:
                await asyncio.sleep(0.2)
        assert await asyncio.wait_for(got.get(), 15) == "two"
    finally:
        await bus.close()
        await p1.close()
        await p2.close()
        drop_vhost(vhost)
