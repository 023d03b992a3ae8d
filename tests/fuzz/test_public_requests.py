"""Invalid public MigrateRequests on ``migration.requested``.

Each is dead-lettered with a reason; a requester with ``reply_to`` gets an
``ErrorReply``; and when the body names a migration or a VM, the coordinator
publishes ``migration.rejected`` with code ``invalid_request`` so that a client
following the migration (``FerryClient.outcome``) learns what was wrong.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from ferry_common.bus.interfaces import Message, QueueSpec
from ferry_common.bus.memory import MemoryBus
from ferry_common.bus.topology import CODE_HEADER, MIGRATION_REQUESTED, REASON_HEADER
from ferry_common.ids import new_id
from ferry_common.messages import decode
from ferry_common.messages.commands import ErrorReply
from ferry_common.messages.public import MigrationStatusEvent
from tests.harness import Cluster, check_invariants, make_cluster, until

GOOD = {"vm_id": "vm1", "target_host": "host-b"}


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    c = await make_cluster("memory")
    await c.create_vm("host-a", "vm1")
    yield c
    await c.close()


def _bus(c: Cluster) -> MemoryBus:
    bus = c.buses[0]
    assert isinstance(bus, MemoryBus)
    return bus


async def publish(c: Cluster, body: bytes, *, reply: bool = False, type_: str = "") -> Message:
    """Publish ``body`` as a client would, and wait until the coordinator dead-lettered it."""
    bus = _bus(c)
    mid = new_id()
    msg = Message(MIGRATION_REQUESTED, body, type=type_, message_id=mid, correlation_id=mid if reply else None,
                  reply_to=f"reply.public-fuzz.{mid}" if reply else None, headers={"x-ferry-sender": "client/fuzz"})
    if reply:
        await bus.declare(QueueSpec(f"public-fuzz.{mid}", (f"reply.public-fuzz.{mid}",), durable=False))
    await bus.publish(msg)

    async def dead() -> bool:
        return any(m.message_id == mid for m in bus.dead_letters)

    await until(dead, 5.0, "the request to be dead-lettered")
    return next(m for m in bus.dead_letters if m.message_id == mid)


def rejections(c: Cluster) -> list[MigrationStatusEvent]:
    return [e for e in c.client._history if e.status == "rejected" and e.code == "invalid_request"]


def body(**fields: Any) -> bytes:
    return orjson.dumps({k: v for k, v in fields.items() if v is not ...})


# body, the words the reason must contain, the migration id and vm id the rejection names
# (None: none published; "?": a fresh migration id)
CASES: dict[str, tuple[bytes, str, str | None, str | None]] = {
    "not_json": (b"migrate vm1 to host-b please", "not JSON", None, None),
    "not_an_object": (b'["vm1", "host-b"]', "JSON object", None, None),
    "empty": (b"", "not JSON", None, None),
    "missing_vm_id": (body(target_host="host-b", migration_id="m-no-vm"), "vm_id", "m-no-vm", "unknown"),
    # target_host may be left out (placement picks one); a malformed one is still refused
    "bad_target": (body(vm_id="vm1", target_host="host b!", migration_id="m-no-target"), "target_host", "m-no-target", "vm1"),
    "extra_field": (body(**GOOD, migration_id="m-extra", force=True), "force", "m-extra", "vm1"),
    "too_long_vm_id": (body(vm_id="v" * 200, target_host="host-b", migration_id="m-long"), "vm_id", "m-long", "unknown"),
    "too_long_migration_id": (body(**GOOD, migration_id="m" * 200), "migration_id", "?", "vm1"),
    "bad_characters": (body(vm_id="vm1; rm -rf /", target_host="host-b", migration_id="m-chars"), "vm_id", "m-chars", "unknown"),
    "wrong_types": (body(vm_id=1, target_host=["host-b"], migration_id="m-types"), "vm_id", "m-types", "unknown"),
    "params_too_deep": (body(**GOOD, migration_id="m-deep", params={"a": [[[[[[[[[[1]]]]]]]]]]}), "params", "m-deep", "vm1"),
    "nothing_salvageable": (body(vm_id=None, migration_id=["x"]), "vm_id", None, None),
}


@pytest.mark.parametrize("reply", [False, True], ids=["no_reply_to", "reply_to"])
@pytest.mark.parametrize("case", sorted(CASES))
async def test_invalid_request_is_dead_lettered_and_the_client_told(cluster: Cluster, case: str, reply: bool) -> None:
    raw, words, mid, vm_id = CASES[case]
    dead = await publish(cluster, raw, reply=reply)
    reason = dead.headers[REASON_HEADER]
    assert words in reason, reason
    assert dead.headers[CODE_HEADER] == "invalid_message"
    if reply:
        q = _bus(cluster).queues[f"public-fuzz.{dead.message_id}"]

        async def answered() -> bool:
            return bool(q.ready)

        await until(answered, 5.0, "the ErrorReply")
        answer = decode(q.ready[0][0].body, ErrorReply)
        assert answer.reason == reason and answer.code == "invalid_message"
    if mid is None:
        await asyncio.sleep(0.05)
        assert not rejections(cluster)
        return

    async def told() -> bool:
        return bool(rejections(cluster))

    await until(told, 5.0, "migration.rejected with code invalid_request")
    (event,) = rejections(cluster)
    assert event.reason == reason and event.vm_id == vm_id and event.step == "request"
    if mid != "?":
        assert event.migration_id == mid
        assert (await cluster.client.outcome(mid, timeout=1.0)).code == "invalid_request"


async def test_an_invalid_request_does_not_speak_for_a_migration_id_in_use(cluster: Cluster) -> None:
    """A malformed request that reuses a running (or ended) migration's id announces nothing."""
    mid = await cluster.client.migrate("vm1", "host-z")  # unknown host: rejected, but recorded
    assert (await cluster.client.outcome(mid, timeout=5.0)).code == "unknown_host"
    await publish(cluster, body(vm_id="vm1", target_host="host b!", migration_id=mid))  # malformed
    await asyncio.sleep(0.05)
    assert not rejections(cluster)


async def test_valid_requests_still_work_after_garbage(cluster: Cluster) -> None:
    for raw, *_ in CASES.values():
        await publish(cluster, raw)
    outcome = await cluster.migrate("vm1", "host-b", timeout=30.0)
    assert outcome.status == "completed", outcome


@pytest.mark.parametrize(
    "params",
    [
        {"poll_interval_s": 0},  # the driver would spin until its completion timeout
        {"poll_interval_s": -1, "completion_timeout_min_s": 1e300, "stall_timeout_s": 1e300},
        {"bandwidth_mibps": "fast"},
        {"downtime_limit_ms": -5},
        {"auto_converge": "yes"},
    ],
)
async def test_hostile_migration_parameters_roll_back_at_once(cluster: Cluster, params: dict[str, Any]) -> None:
    """Parameters are a public input: a bad one fails the VM step with a reason, the VM stays put."""
    await cluster.send_events("vm1", 3)
    outcome = await cluster.migrate("vm1", "host-b", params=params, timeout=20.0)
    assert outcome.status == "rolled_back", outcome
    assert outcome.code == "invalid_message" and "migration parameter" in (outcome.reason or ""), outcome
    await check_invariants(cluster, "vm1", "host-a")
    # nothing was started on the source: at most the clean-up's mark that fences a late start
    outgoing = cluster.host("host-a").adapter.outgoing.values()
    assert all(o.task is None and o.result is not None and o.result.outcome == "failed" for o in outgoing)
