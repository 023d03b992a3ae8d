"""A saga that gives up while the source adapter is down sends its clean-up behind the
PerformMigration still queued for it: the restarted adapter may take the clean-up first. The
late PerformMigration must then not start the copy (it would leave the guest ``postmigrate`` on
the source, with its target already torn down: running nowhere)."""

from __future__ import annotations

import asyncio
from typing import Any

from ferry_common.messages.commands import CleanupSource, MigrationStarted, PerformMigration
from tests.harness import make_cluster


async def test_a_perform_after_the_clean_up_never_starts() -> None:
    c = await make_cluster("memory", ("host-a", "host-b"))
    try:
        await c.create_vm("host-a", "vm1", memory_mib=256, sim_instant=True)
        adapter = c.host("host-a").adapter
        ctx: Any = None  # neither handler reads its context
        done = await adapter.source.on_cleanup_source(CleanupSource(migration_id="m-late", vm_id="vm1"), ctx)
        assert done.detail["source_state"] == "running"
        ans = await adapter.source.on_perform(PerformMigration(migration_id="m-late", vm_id="vm1", uri="sim://host-b",
                                                        target_host="host-b"), ctx)
        assert isinstance(ans, MigrationStarted) and ans.already and ans.finished is not None, ans
        assert ans.finished.outcome == "failed"
        await asyncio.sleep(0.2)
        assert await adapter.driver.state("vm1") == "running"
    finally:
        await c.close()
