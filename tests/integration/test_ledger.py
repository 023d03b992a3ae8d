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


async def test_the_dedup_window_is_stored_row_by_row_and_survives_a_restart(monkeypatch) -> None:
    """Each dispatch stores the ids it applied (not the whole window again); the window's old
    rows go when it is trimmed; after a restart a replayed dispatch acts on nothing."""
    from ferry_common.bus.topology import host_command
    from ferry_common.messages.commands import DispatchEvents
    from ferry_managed_object import plane as plane_module

    monkeypatch.setattr(plane_module, "RECENT_IDS", 4)  # trimmed past 16 ids, down to 12
    c = await make_cluster("memory", ("host-a", "host-b"))
    try:
        await c.create_vm("host-a", "vm1")
        mo = c.host("host-a").managed_object
        await c.send_events("vm1", 20)

        async def all_dispatched() -> bool:
            return mo.dispatched_count("vm1") == 20

        await until(all_dispatched, 10, "20 events dispatched")
        window = list(mo.planes["vm1"].recent)
        assert window == [e.id for e in c.sent["vm1"]][-len(window):] and len(window) < 20
        stored = await mo.state.items("recent.vm1")
        assert [v for _, v in stored] == window

        await mo.stop()
        again = build_service("managed_object", "host-a", mo.endpoint.bus, state=mo.state)
        assert isinstance(again, ManagedObjectService)
        await again.start()
        c.host("host-a").services["managed_object"] = again
        assert list(again.planes["vm1"].recent) == window
        seen_before = again.planes["vm1"].state["vm1.load"]["seen"]
        # the sensor's dispatch of the window again (a redelivery), then two new events behind it
        replay = [e for e in c.sent["vm1"] if e.id in window]
        await c.client.endpoint.send(host_command("host-a", "managed_object"), DispatchEvents(vm_id="vm1", events=replay))
        await c.send_events("vm1", 2)

        async def two_more() -> bool:
            return again.dispatched_count("vm1") >= 22

        await until(two_more, 10, "2 more events dispatched")
        assert again.dispatched_count("vm1") == 22
        assert again.planes["vm1"].state["vm1.load"]["seen"] == seen_before + 2
        assert [v for _, v in await again.state.items("recent.vm1")] == list(again.planes["vm1"].recent)
    finally:
        await c.close()
