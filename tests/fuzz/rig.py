"""A memory-bus cluster driven from synchronous hypothesis tests, and a way to see what
became of one message: handled (and answered), or dead-lettered with a reason."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ferry_common.bus.interfaces import Message, QueueSpec
from ferry_common.bus.memory import MemoryBus
from ferry_common.bus.topology import CODE_HEADER, COORDINATOR_QUERY, REASON_HEADER, host_command
from ferry_common.endpoint import Endpoint, Router
from ferry_common.ids import new_id
from ferry_common.messages import decode, model_for
from ferry_common.messages.commands import ErrorReply, Inspect, Inspection
from ferry_common.security import NoAuth
from tests.harness import Cluster, make_cluster

T = TypeVar("T")
HOST_SERVICES = ("sensor", "managed_object", "migration_policy", "hypervisor_adapter")
PROBE_QUEUE = "fuzz.replies"
SETTLE_S = 10.0


class Recorder(NoAuth):
    """Accepts everything, and remembers which messages were handled to the end."""

    def __init__(self) -> None:
        self.ids: set[str] = set()

    def accepted(self, message: Message) -> None:
        self.ids.add(message.message_id)


@dataclass
class Outcome:
    """What became of one published message."""

    message: Message
    handled: bool
    reason: str = ""
    code: str = ""
    reply: Message | None = None
    # (reason, code) of every dead-lettered copy: a key bound by two queues dead-letters twice
    copies: list[tuple[str, str]] = field(default_factory=list)

    def reply_model(self) -> Any:
        assert self.reply is not None
        return decode(self.reply.body, model_for(self.reply.type))


@dataclass
class Target:
    """A queue under test: its routing key, the router behind it, the endpoint serving it."""

    name: str
    routing_key: str
    router: Router
    endpoint: Endpoint


@dataclass
class Rig:
    runner: asyncio.Runner
    cluster: Cluster
    bus: MemoryBus
    targets: dict[str, Target] = field(default_factory=dict)
    tally: dict[str, int] = field(default_factory=dict)

    def run(self, coro: Awaitable[T], timeout: float = 30.0) -> T:
        async def bounded() -> T:
            return await asyncio.wait_for(coro, timeout)

        return self.runner.run(bounded())

    def count(self, what: str) -> None:
        self.tally[what] = self.tally.get(what, 0) + 1

    async def deliver(
        self,
        target: Target,
        body: bytes,
        *,
        type_: str = "",
        reply: bool = False,
        routing_key: str | None = None,
    ) -> Outcome:
        """Publish raw ``body`` to ``target`` and wait until it is handled or dead-lettered."""
        mid = new_id()
        msg = Message(
            routing_key=routing_key or target.routing_key,
            body=body,
            type=type_,
            message_id=mid,
            correlation_id=new_id() if reply else None,
            reply_to=f"reply.fuzz.{mid}" if reply else None,
            headers={"x-ferry-sender": "fuzz"},
        )
        recorder = target.endpoint.auth
        assert isinstance(recorder, Recorder)
        await self.bus.publish(msg)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_S
        while True:
            dead = next((m for m in reversed(self.bus.dead_letters) if m.message_id == mid), None)
            if dead is not None or mid in recorder.ids:
                break
            if loop.time() > deadline:
                raise AssertionError(f"{target.name}: message neither handled nor dead-lettered within {SETTLE_S}s (hang)")
            await asyncio.sleep(0.001)
        out = Outcome(msg, handled=dead is None)
        if dead is not None:
            out.reason = dead.headers.get(REASON_HEADER, "")
            out.code = dead.headers.get(CODE_HEADER, "")
            out.copies = [
                (m.headers.get(REASON_HEADER, ""), m.headers.get(CODE_HEADER, ""))
                for m in self.bus.dead_letters
                if m.message_id == mid
            ]
        if reply:
            # a handled request's reply is sent before the ack, an ErrorReply right after
            # the dead-letter copy; handlers of notifications answer nothing
            out.reply = self._reply_for(msg)
            while out.reply is None and not out.handled and loop.time() < deadline:
                await asyncio.sleep(0.001)
                out.reply = self._reply_for(msg)
        return out

    def _reply_for(self, msg: Message) -> Message | None:
        q = self.bus.queues[PROBE_QUEUE]
        for m, _ in q.ready:
            if m.correlation_id == msg.correlation_id and m.routing_key == msg.reply_to:
                return m
        return None

    async def alive(self, target: Target) -> None:
        """The consumer still works: a valid Inspect gets its Inspection."""
        client = self.cluster.client.endpoint
        key = COORDINATOR_QUERY if target.name == "coordinator" else target.routing_key
        ans = await client.request(key, Inspect(), timeout=5.0)
        assert isinstance(ans, Inspection), ans

    def purge_replies(self) -> None:
        self.bus.queues[PROBE_QUEUE].ready.clear()


def check_outcome(out: Outcome, rig: Rig, *, expect_invalid: bool) -> None:
    """The acknowledgement policy, as seen from outside."""
    if out.handled:
        assert not expect_invalid, f"garbage was handled: {out.message.body[:200]!r}"
        rig.count("handled")
        return
    rig.count(f"dead:{out.code}")
    assert out.reason.strip(), "dead-lettered without a reason"
    assert out.code != "internal", f"handler bug on {out.message.type or out.message.routing_key}: {out.reason}"
    if out.message.reply_to:
        assert out.reply is not None, f"no ErrorReply for a dead-lettered request ({out.reason})"
        answer = out.reply_model()
        assert isinstance(answer, ErrorReply), answer
        assert (answer.reason, answer.code) in out.copies, (answer, out.copies)


async def build_rig(runner: asyncio.Runner) -> tuple[Cluster, MemoryBus, dict[str, Target]]:
    cluster = await make_cluster("memory")
    bus = cluster.buses[0]
    assert isinstance(bus, MemoryBus)
    await cluster.create_vm("host-a", "vm1")
    await bus.declare(QueueSpec(PROBE_QUEUE, ("reply.fuzz.*",), durable=False))
    targets: dict[str, Target] = {}
    for host in ("host-a", "host-b"):
        for s in HOST_SERVICES:
            service = cluster.host(host).services[s]
            service.endpoint.auth = Recorder()
            targets[f"{host}/{s}"] = Target(f"{host}/{s}", host_command(host, s), service.router, service.endpoint)
    coord = cluster.coordinator
    coord.endpoint.auth = Recorder()
    targets["coordinator"] = Target("coordinator", "migration.requested", coord.router, coord.endpoint)
    return cluster, bus, targets


def rig_fixture() -> Iterator[Rig]:
    """Body of the module-scoped ``rig`` fixture: one cluster for all examples."""
    runner = asyncio.Runner()
    cluster, bus, targets = runner.run(build_rig(runner))
    rig = Rig(runner, cluster, bus, targets)
    try:
        yield rig
    finally:
        runner.run(cluster.close())
        runner.close()
