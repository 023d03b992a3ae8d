"""The managed-object service's audit trail of dispatched events is bounded per VM: a host
that dispatches for months keeps the newest ``ledger_max`` ids, in memory and in its state
store, across a restart, and still counts everything it dispatched."""

from __future__ import annotations

from ferry_cli.cluster import HostOptions, build_service
from ferry_managed_object.service import ManagedObjectService
from tests.harness import make_cluster, until


async def test_the_ledger_keeps_the_newest_entries_across_a_restart() -> None:
    c = await make_cluster("memory", ("host-a", "host-b"), options={"host-a": HostOptions(ledger_max=5)})
    try:
        await c.create_vm("host-a", "vm1")
        mo = c.host("host-a").managed_object
        assert mo.ledger_max == 5
        await c.send_events("vm1", 12)

        async def all_dispatched() -> bool:
            return mo.dispatched_count("vm1") == 12

        await until(all_dispatched, 10, "12 events dispatched")
        newest = [e.id for e in c.sent["vm1"]][-5:]
        assert mo.ledger["vm1"] == newest
        stored = await mo.state.items("ledger.vm1")
        assert [v for _, v in stored] == newest and stored[0][0] == f"{7:012d}"

        # a restart on the same state: the same trail, and counting goes on where it was
        await mo.stop()
        again = build_service("managed_object", "host-a", mo.endpoint.bus, state=mo.state,
                              options=HostOptions(ledger_max=5))
        assert isinstance(again, ManagedObjectService)
        await again.start()
        c.host("host-a").services["managed_object"] = again
        assert again.ledger["vm1"] == newest and again.dispatched_count("vm1") == 12
        await c.send_events("vm1", 3)

        async def three_more() -> bool:
            return again.dispatched_count("vm1") == 15

        await until(three_more, 10, "3 more events dispatched")
        assert again.ledger["vm1"] == [e.id for e in c.sent["vm1"]][-5:]
        assert len(await again.state.items("ledger.vm1")) == 5
        # the VM still migrates, with its trail on both hosts
        outcome = await c.migrate("vm1", "host-b")
        assert outcome.status == "completed", outcome
    finally:
        await c.close()
