"""One RabbitMQ user per service (``scripts/rabbitmq-users.sh``) on the real broker: each
service does its whole job as its own user, and a user reaches nothing it does not need."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiormq.exceptions import ChannelAccessRefused

from ferry_cli.client import FerryClient
from ferry_cli.cluster import HOST_SERVICES, build_coordinator, build_service
from ferry_common.bus.amqp import AmqpBus
from ferry_common.bus.interfaces import QueueSpec
from ferry_common.endpoint import Endpoint
from ferry_coordinator.store import MemorySagaStore
from tests.harness import AMQP_BASE, drop_vhost, make_vhost

pytestmark = pytest.mark.rabbitmq
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "rabbitmq-users.sh"


@dataclass
class Users:
    vhost: str
    host: str
    client: str
    ops: str
    passwords: Path

    def url(self, user: str) -> str:
        password = (self.passwords / user).read_text()
        hostport = AMQP_BASE.split("@", 1)[1].split("/", 1)[0]
        return f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@{hostport}/{quote(self.vhost, safe='')}"


def _ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, check=False)


@pytest.fixture
def users(rabbitmq_available: None, tmp_path: Path) -> Iterator[Users]:
    tag = uuid.uuid4().hex[:6]
    vhost = make_vhost()  # guest may set up what the test needs to exist beforehand
    u = Users(vhost, f"h{tag}", f"c{tag}", f"ferry-ops-{tag}", tmp_path / "passwords")
    existed = set(_ctl("list_users", "--silent").stdout.split())
    env = {**os.environ, "FERRY_HOSTS": u.host, "FERRY_CLIENTS": u.client, "FERRY_RMQ_VHOST": vhost,
           "FERRY_RMQ_PASSWORDS": str(u.passwords), "FERRY_RMQ_OPS_USER": u.ops}
    made = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, check=False)
    created = set(_ctl("list_users", "--silent").stdout.split()) - existed
    try:
        assert made.returncode == 0, made.stderr
        if "ferry-coordinator" not in created:  # made earlier, its password is not ours to read
            pytest.skip("user ferry-coordinator exists already on this broker")
        yield u
    finally:
        for user in created:
            _ctl("delete_user", user)
        drop_vhost(vhost)


async def test_every_service_does_its_job_as_its_own_user(users: Users) -> None:
    """Coordinator and the four host services, each connected as its own user, serve a
    client that is connected as its own: queues declared, bound, consumed, answered."""
    async with contextlib.AsyncExitStack() as stack:  # each service stops before its bus closes

        async def bus_for(user: str) -> AmqpBus:
            bus = AmqpBus(users.url(user), name=user)
            await bus.connect()
            stack.push_async_callback(bus.close)
            return bus

        coordinator = build_coordinator(await bus_for("ferry-coordinator"), MemorySagaStore())
        await coordinator.start()
        stack.push_async_callback(coordinator.stop)
        for name in HOST_SERVICES:
            service = build_service(name, users.host, await bus_for(f"ferry-{users.host}-{name}"))
            await service.start()
            stack.push_async_callback(service.stop)
        client = FerryClient(Endpoint(await bus_for(f"ferry-client-{users.client}"), f"client/{users.client}"))
        await client.watch()
        seen = await client.inspect(users.host)
        assert set(seen) == set(HOST_SERVICES), seen
        assert await client.migrations() == []
        await client.close()


Op = Callable[[AbstractChannel], Awaitable[Any]]


async def _refused(url: str, op: Op) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        with pytest.raises(ChannelAccessRefused):
            await op(channel)
    finally:
        await connection.close()


async def _allowed(url: str, op: Op) -> None:
    connection = await aio_pika.connect(url)
    try:
        await op(await connection.channel(publisher_confirms=True))
    finally:
        await connection.close()


def _consume(queue: str) -> Op:
    async def op(channel: AbstractChannel) -> None:
        async def ignore(message: AbstractIncomingMessage) -> None:
            await message.nack(requeue=True)

        q = await channel.get_queue(queue, ensure=False)
        tag = await q.consume(ignore)
        await q.cancel(tag)

    return op


def _publish(routing_key: str) -> Op:
    async def op(channel: AbstractChannel) -> None:
        exchange = await channel.get_exchange("ferry", ensure=False)
        await exchange.publish(aio_pika.Message(b"{}"), routing_key=routing_key, mandatory=False)

    return op


def _bind_own_reply_queue(client: str, routing_key: str) -> Op:
    async def op(channel: AbstractChannel) -> None:
        q = await channel.declare_queue(f"reply.client.{client}.0123abcd", exclusive=True)
        await q.bind("ferry", routing_key)

    return op


async def test_a_user_reaches_only_what_it_needs(users: Users) -> None:
    # the queues exist (as after a start), declared by guest so every check below is about
    # permissions, not about a missing queue
    guest = AmqpBus(AMQP_BASE.rstrip("/") + "/" + users.vhost, name="guest")
    await guest.connect()  # also declares the exchanges and the dead-letter queue
    for queue in ("ferry.coordinator", f"ferry.{users.host}.sensor", f"ferry.{users.host}.managed_object"):
        await guest.declare(QueueSpec(queue, ()))
    await guest.close()

    sensor = users.url(f"ferry-{users.host}-sensor")
    client = users.url(f"ferry-client-{users.client}")
    ops = users.url(users.ops)

    await _allowed(sensor, _consume(f"ferry.{users.host}.sensor"))
    await _refused(sensor, _consume("ferry.coordinator"))  # another service's queue
    await _refused(sensor, _consume(f"ferry.{users.host}.managed_object"))  # a neighbour's
    await _refused(sensor, _consume("ferry.dead-letter"))  # poison messages are for ops

    await _allowed(client, _publish("migration.requested"))
    await _refused(client, _publish("saga.notify"))  # the coordinator's own traffic
    await _allowed(client, _bind_own_reply_queue(users.client, f"reply.client.{users.client}.0123abcd"))
    await _refused(client, _bind_own_reply_queue(users.client, "reply.#"))  # everybody's answers
    await _refused(client, _consume(f"ferry.{users.host}.sensor"))

    await _allowed(ops, _consume("ferry.dead-letter"))
    await _refused(ops, _consume("ferry.coordinator"))
    await _refused(ops, _publish("migration.requested"))
