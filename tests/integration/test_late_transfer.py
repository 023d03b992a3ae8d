"""A state transfer that arrives after its migration was rolled back stages nothing."""

from __future__ import annotations

from ferry_common.bus.topology import host_command
from ferry_common.messages.commands import CleanupTarget, ManagementState, ManagementStateFailed
from ferry_testing.sample import MODULES, graph
from tests.harness import make_cluster


async def test_a_transfer_after_the_targets_clean_up_is_refused_and_stages_nothing(bus_kind: str) -> None:
    c = await make_cluster(bus_kind, ("host-a", "host-b"))
    try:
        mo = host_command("host-b", "managed_object")
        # the saga rolled back and cleaned the target; the source's push comes after that
        await c.client.endpoint.request(mo, CleanupTarget(migration_id="m-late", vm_id="vm1"), timeout=10)
        late = ManagementState(migration_id="m-late", vm_id="vm1", graph=graph("vm1"), modules=MODULES)
        answer = await c.client.endpoint.request(mo, late, timeout=10)
        assert isinstance(answer, ManagementStateFailed), answer
        assert "rolled back" in answer.reason
        assert "vm1" not in c.host("host-b").services["managed_object"].planes  # type: ignore[attr-defined]
        # the same transfer for a migration that was not rolled back stages as before
        fresh = ManagementState(migration_id="m-new", vm_id="vm1", graph=graph("vm1"), modules=MODULES)
        assert not isinstance(await c.client.endpoint.request(mo, fresh, timeout=10), ManagementStateFailed)
    finally:
        await c.close()
