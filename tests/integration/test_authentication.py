"""Signed messages end to end: a migration with every message signed and checked, and
what happens to messages that are unsigned, forged, replayed or not permitted."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry_common.bus.memory import MemoryBus
from ferry_common.bus.topology import MIGRATION_CANCEL, MIGRATION_REQUESTED
from ferry_common.endpoint import Endpoint
from ferry_common.messages.public import MigrateRequest, MigrationCancel
from ferry_common.signing import auth_factory_from_env, init_keydir
from tests.harness import Cluster, inspect_problems, make_cluster, until


@pytest.fixture
async def signed(tmp_path: Path, bus_kind: str):
    keys = init_keydir(tmp_path / "keys", hosts=["host-a", "host-b"], clients=["test"])
    auth = auth_factory_from_env(environ={"FERRY_AUTH": "ed25519", "FERRY_KEYS_DIR": str(keys)})
    c = await make_cluster(bus_kind, ("host-a", "host-b"), auth=auth)
    c.auth = auth  # type: ignore[attr-defined]
    yield c
    await c.close()


async def test_a_signed_migration_completes(signed: Cluster) -> None:
    await signed.create_vm("host-a", "vm1", memory_mib=256)
    await signed.send_events("vm1", 10)
    assert (await signed.migrate("vm1", "host-b")).status == "completed"
    assert await inspect_problems(signed, "vm1", "host-b") == []
    assert signed.coordinator.endpoint.stats["unauthenticated"] == 0


async def _rejected(c: Cluster, before: int) -> None:
    async def counted() -> bool:
        return c.coordinator.endpoint.stats["unauthenticated"] > before
    await until(counted, 5, "the coordinator to refuse the message")


async def test_unsigned_forged_replayed_and_unpermitted_requests_are_refused(signed: Cluster) -> None:
    c = signed
    await c.create_vm("host-a", "vm1", memory_mib=256)
    bus = c.client.endpoint.bus
    stats = c.coordinator.endpoint.stats

    # unsigned: an endpoint without keys
    before = stats["unauthenticated"]
    await Endpoint(bus, "client/mallory").send(MIGRATION_REQUESTED, MigrateRequest(vm_id="vm1", target_host="host-b", migration_id="m-unsigned"))
    await _rejected(c, before)

    # forged: signed by the test client's key but claiming to be another client
    before = stats["unauthenticated"]
    msg = c.client.endpoint.build(MIGRATION_REQUESTED, MigrateRequest(vm_id="vm1", target_host="host-b", migration_id="m-forged"))
    await bus.publish(msg.with_headers(**{"x-ferry-sender": "client/ops"}))
    await _rejected(c, before)

    # a host may not cancel migrations
    before = stats["unauthenticated"]
    host_ep = Endpoint(bus, "host/host-a/sensor", auth=c.auth("host/host-a/sensor"))  # type: ignore[attr-defined]
    await host_ep.send(MIGRATION_CANCEL, MigrationCancel(migration_id="m-x"))
    await _rejected(c, before)

    assert await c.store.get("m-unsigned") is None and await c.store.get("m-forged") is None

    # replayed: the same signed request again, after it was handled, starts nothing new
    msg = c.client.endpoint.build(MIGRATION_REQUESTED, MigrateRequest(vm_id="vm1", target_host="host-b", migration_id="m-ok"))
    await c.client.endpoint.bus.publish(msg)
    assert (await c.client.outcome("m-ok", timeout=30)).status == "completed"
    before = stats["unauthenticated"]
    await bus.publish(msg)
    await _rejected(c, before)
    if isinstance(bus, MemoryBus):
        reasons = bus.dead_letter_reasons()
        assert any("signature" in r for r in reasons), reasons
        assert any("replay" in r for r in reasons), reasons
    assert await inspect_problems(c, "vm1", "host-b") == []
