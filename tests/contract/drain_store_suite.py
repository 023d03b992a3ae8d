"""The drain store contract: every saga store's ``drains`` runs this suite unchanged (mixed
into :class:`~tests.contract.store_suite.SagaStoreSuite`, like the fleet queue's)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from ferry_common.errors import Conflict
from ferry_coordinator.fleet.drain import Drain, DrainState, DrainVm, VmState, migration_id
from ferry_coordinator.fleet.queue import EntryState, Priority, new_entry
from ferry_coordinator.store import SagaStore

MakeStore = Callable[[], Awaitable[SagaStore]]


def drain(drain_id: str = "d-1", host: str = "host-a", *, at: float = 100.0, vms: int = 2) -> Drain:
    return Drain(
        drain_id=drain_id, host=host, created_at=at, updated_at=at,
        vms={f"vm-{i}": DrainVm(f"vm-{i}", memory_mib=512) for i in range(vms)},
    )


def drain_entry(d: Drain, vm_id: str, attempt: int = 1):  # type: ignore[no-untyped-def]
    return new_entry(migration_id(d.drain_id, vm_id, attempt), vm_id, d.host, ("host-b",),
                     priority=Priority.DRAIN, group=d.drain_id, now=d.created_at,
                     request={"vm_id": vm_id, "target_host": "host-b"})


class DrainStoreSuite:
    async def test_create_is_idempotent_and_one_active_per_host(self, store: SagaStore) -> None:
        stored, created = await store.drains.create(drain())
        assert created and stored.version == 1 and stored.state is DrainState.DRAINING
        again, created = await store.drains.create(drain())
        assert not created and again.drain_id == "d-1"
        other, created = await store.drains.create(drain("d-2"))
        assert not created and other.drain_id == "d-1"  # the host's active drain
        _, created = await store.drains.create(drain("d-3", "host-b"))
        assert created

    async def test_round_trip_and_versioned_save(self, store: SagaStore) -> None:
        stored, _ = await store.drains.create(drain())
        stored.vms["vm-0"].state = VmState.DONE
        stored.vms["vm-0"].target = "host-c"
        stored.durations.append(0.5)
        saved = await store.drains.save(stored)
        assert saved.version == 2
        got = await store.drains.get("d-1")
        assert got is not None and got.vms["vm-0"].state is VmState.DONE and got.moved() == {"vm-0": "host-c"}
        assert list(got.vms) == ["vm-0", "vm-1"]  # drain order kept
        with pytest.raises(Conflict):
            await store.drains.save(stored)  # version 1 is stale

    async def test_concurrent_saves_one_wins(self, make_store: MakeStore) -> None:
        a, b = await make_store(), await make_store()
        d, _ = await a.drains.create(drain())
        results = await asyncio.gather(a.drains.save(d.copy()), b.drains.save(d.copy()), return_exceptions=True)
        assert sum(isinstance(r, Conflict) for r in results) == 1

    async def test_ended_drain_frees_the_host_and_latest_and_list(self, store: SagaStore) -> None:
        d, _ = await store.drains.create(drain())
        await store.drains.save(d.to(DrainState.DRAINED, now=101.0))
        _, created = await store.drains.create(drain("d-2", at=200.0))
        assert created
        latest = await store.drains.latest("host-a")
        assert latest is not None and latest.drain_id == "d-2"
        assert [x.drain_id for x in await store.drains.list(active=True)] == ["d-2"]
        assert [x.drain_id for x in await store.drains.list()] == ["d-1", "d-2"]
        assert await store.drains.latest("host-z") is None

    async def test_enqueue_only_while_draining(self, store: SagaStore) -> None:
        d, _ = await store.drains.create(drain())
        e = await store.drains.enqueue("d-1", drain_entry(d, "vm-0"))
        assert e is not None and e.state is EntryState.QUEUED and e.group == "d-1"
        again = await store.drains.enqueue("d-1", drain_entry(d, "vm-0"))
        assert again is not None and again.migration_id == e.migration_id  # idempotent by id
        assert await store.drains.enqueue("nope", drain_entry(d, "vm-1")) is None
        await store.drains.cancel("d-1", now=150.0, reason="operator")
        assert await store.drains.enqueue("d-1", drain_entry(d, "vm-1")) is None
        assert await store.queue.get(migration_id("d-1", "vm-1", 1)) is None

    async def test_cancel_cancels_queued_entries_not_started_ones(self, store: SagaStore) -> None:
        d, _ = await store.drains.create(drain(vms=3))
        for vm in d.vms:
            await store.drains.enqueue("d-1", drain_entry(d, vm))
        started = await store.queue.claim_next("c1", now=101.0)
        assert started is not None
        cancelled = await store.drains.cancel("d-1", now=150.0, reason="operator")
        assert cancelled is not None and cancelled.state is DrainState.CANCELLED and cancelled.reason == "operator"
        states = {e.migration_id: e.state for e in await store.queue.entries(group="d-1")}
        assert states.pop(started.migration_id) is EntryState.STARTED
        assert set(states.values()) == {EntryState.CANCELLED}
        assert await store.queue.claim_next("c1", now=151.0) is None  # nothing of it starts again
        # cancelling again is harmless; an unknown drain is None
        again = await store.drains.cancel("d-1", now=160.0, reason="again")
        assert again is not None and again.reason == "operator"
        assert await store.drains.cancel("nope", now=1.0, reason="x") is None

    async def test_cancel_and_enqueue_race_never_leaves_a_queued_entry(self, make_store: MakeStore) -> None:
        a, b = await make_store(), await make_store()
        d, _ = await a.drains.create(drain(vms=20))
        entries = [drain_entry(d, vm) for vm in d.vms]

        async def enqueue_all() -> None:
            for e in entries:
                await b.drains.enqueue("d-1", e)

        await asyncio.gather(enqueue_all(), a.drains.cancel("d-1", now=150.0, reason="race"))
        queued = await a.queue.entries(states=(EntryState.QUEUED,), group="d-1")
        assert queued == []

    async def test_cordoned_follows_the_latest_drain(self, store: SagaStore) -> None:
        assert await store.drains.cordoned() == set()
        d, _ = await store.drains.create(drain())
        await store.drains.create(drain("d-b", "host-b"))
        assert await store.drains.cordoned() == {"host-a", "host-b"}
        d = await store.drains.save(d.to(DrainState.DRAINED, now=101.0))
        d.cordoned = False
        await store.drains.save(d)
        assert await store.drains.cordoned() == {"host-b"}

    async def test_open_drains_are_those_with_work_left(self, store: SagaStore) -> None:
        d, _ = await store.drains.create(drain(vms=1))
        assert [x.drain_id for x in await store.drains.open()] == ["d-1"]
        d.vms["vm-0"].state = VmState.IN_FLIGHT
        d = await store.drains.save(d.to(DrainState.CANCELLED, now=101.0))
        assert [x.drain_id for x in await store.drains.open()] == ["d-1"]  # its migration still runs
        d.vms["vm-0"].state = VmState.CANCELLED
        await store.drains.save(d)
        assert await store.drains.open() == []
        other, _ = await store.drains.create(drain("d-2", "host-b", vms=0))
        await store.drains.cancel("d-2", now=102.0, reason="x")
        assert await store.drains.open() == []
