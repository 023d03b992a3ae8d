"""The fleet's RabbitMQ users on the real broker (``FERRY_HOSTS='*' scripts/rabbitmq-users.sh``):
one user per host service for every node, as the DaemonSets connect; each does its job on a node
whose name has dots, and reaches no other service's queue."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import ChannelAccessRefused

from ferry_cli.client import FerryClient
from ferry_cli.cluster import build_service
from ferry_common.bus.amqp import AmqpBus
from ferry_common.bus.topology import HOST_SERVICES, host_queue
from ferry_common.endpoint import Endpoint
from tests.harness import AMQP_BASE, drop_vhost, make_vhost

pytestmark = pytest.mark.rabbitmq
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "rabbitmq-users.sh"
NODE = "node-1.rack-2.example"


def _ctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, check=False).stdout


@pytest.fixture
def fleet(rabbitmq_available: None, tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    vhost = make_vhost()
    existed = set(_ctl("list_users", "--silent").split())
    if existed & {f"ferry-{s}" for s in HOST_SERVICES}:
        drop_vhost(vhost)
        pytest.skip("fleet users exist already on this broker (their passwords are not ours)")
    env = {**os.environ, "FERRY_HOSTS": "*", "FERRY_CLIENTS": "", "FERRY_RMQ_OPS_USER": "",
           "FERRY_RMQ_VHOST": vhost, "FERRY_RMQ_PASSWORDS": str(tmp_path)}
    made = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, check=False)
    created = set(_ctl("list_users", "--silent").split()) - existed
    try:
        assert made.returncode == 0, made.stderr
        hostport = AMQP_BASE.split("@", 1)[1].split("/", 1)[0]
        urls = {s: f"amqp://ferry-{s}:{quote((tmp_path / f'ferry-{s}').read_text(), safe='')}@{hostport}/"
                   f"{quote(vhost, safe='')}" for s in HOST_SERVICES}
        yield vhost, urls
    finally:
        for user in created:
            _ctl("delete_user", user)
        drop_vhost(vhost)


async def test_each_host_service_works_as_its_fleet_user(fleet: tuple[str, dict[str, str]]) -> None:
    vhost, urls = fleet
    async with contextlib.AsyncExitStack() as stack:  # each service stops before its bus closes
        for name in HOST_SERVICES:
            bus = AmqpBus(urls[name], name=name)
            await bus.connect()
            stack.push_async_callback(bus.close)
            service = build_service(name, NODE, bus)
            await service.start()
            stack.push_async_callback(service.stop)
        guest = AmqpBus(AMQP_BASE.rstrip("/") + "/" + vhost, name="guest")
        await guest.connect()
        stack.push_async_callback(guest.close)
        client = FerryClient(Endpoint(guest, "client/test"))
        assert set(await client.inspect(NODE)) == set(HOST_SERVICES)
        await client.close()
        # the sensor's user may not consume its neighbour's queue on the same node
        connection = await aio_pika.connect(urls["sensor"])
        try:
            channel = await connection.channel()
            queue = await channel.get_queue(host_queue(NODE, "managed_object"), ensure=False)

            async def ignore(message: AbstractIncomingMessage) -> None:
                await message.nack(requeue=True)

            with pytest.raises(ChannelAccessRefused):
                await queue.consume(ignore)
        finally:
            await connection.close()
