"""The saga store contract: every ``SagaStore`` backend runs this suite unchanged.

A backend's test module subclasses :class:`SagaStoreSuite` and overrides the ``make_store``
fixture. ``make_store()`` opens a *handle* onto the backend's storage; calling it twice must
give two handles onto the same storage (two connections, as two coordinator replicas would
have), so the concurrency tests exercise the database's atomicity rather than one object's.
A backend without separate handles (memory) returns the same object each time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from ferry_common.errors import Conflict
from ferry_coordinator.store import TERMINAL, HistoryEntry, SagaRecord, SagaStore

from .drain_store_suite import DrainStoreSuite
from .fleet_queue_suite import FleetQueueSuite, race_for_one_vm

MakeStore = Callable[[], Awaitable[SagaStore]]


def saga(
    migration_id: str = "m-1", vm_id: str = "vm-1", *, created_at: float = 100.0, **kw: Any
) -> SagaRecord:
    """A fresh saga record with plausible defaults."""
    return SagaRecord(
        migration_id=migration_id,
        vm_id=vm_id,
        source_host=kw.pop("source_host", "host-a"),
        target_host=kw.pop("target_host", "host-b"),
        created_at=created_at,
        updated_at=kw.pop("updated_at", created_at),
        **kw,
    )


@contextlib.asynccontextmanager
async def handles(url: str) -> AsyncIterator[MakeStore]:
    """``make_store`` for a backend opened by URL: every call opens a handle of its own onto
    the same storage (its own connection or pool), and all are closed on the way out."""
    from ferry_coordinator.store import open_store

    opened: list[SagaStore] = []

    async def make() -> SagaStore:
        store = await open_store(url)
        opened.append(store)
        return store

    try:
        yield make
    finally:
        for store in opened:
            await store.close()


class SagaStoreSuite(FleetQueueSuite, DrainStoreSuite):
    """Abstract: subclass it (``TestXxxSagaStore``) and override ``make_store``."""

    @pytest.fixture
    async def make_store(self) -> AsyncIterator[MakeStore]:
        raise NotImplementedError("override make_store in the backend's test class")
        yield  # pragma: no cover - makes this an async generator like the overrides

    @pytest.fixture
    async def store(self, make_store: MakeStore) -> SagaStore:
        return await make_store()

    # --- create -----------------------------------------------------------------------------

    async def test_create_stores_the_record_at_version_1(self, store: SagaStore) -> None:
        rec = saga(data={"k": [1, 2, {"x": None}]}, step="prepare")
        stored, created = await store.create(rec)
        assert created is True
        assert stored.version == 1
        fetched = await store.get("m-1")
        assert fetched is not None
        assert fetched.to_dict() == stored.to_dict()
        assert (fetched.vm_id, fetched.source_host, fetched.target_host) == (
            "vm-1",
            "host-a",
            "host-b",
        )
        assert fetched.step == "prepare"
        assert fetched.data == {"k": [1, 2, {"x": None}]}

    async def test_get_unknown_is_none(self, store: SagaStore) -> None:
        assert await store.get("nope") is None

    async def test_create_is_idempotent_by_id(self, store: SagaStore) -> None:
        first, _ = await store.create(saga(step="admission"))
        again, created = await store.create(saga(step="something-else", vm_id="vm-1"))
        assert created is False
        assert again.to_dict() == first.to_dict()

    async def test_create_same_id_other_vm_returns_the_original(self, store: SagaStore) -> None:
        await store.create(saga("m-1", "vm-1"))
        again, created = await store.create(saga("m-1", "vm-2"))
        assert created is False
        assert again.vm_id == "vm-1"
        assert await store.active_for_vm("vm-2") is None

    async def test_one_active_saga_per_vm(self, store: SagaStore) -> None:
        first, _ = await store.create(saga("m-1", "vm-1"))
        other, created = await store.create(saga("m-2", "vm-1", created_at=200.0))
        assert created is False
        assert other.migration_id == "m-1"
        assert await store.get("m-2") is None
        # a different VM is unaffected
        _, created = await store.create(saga("m-3", "vm-2"))
        assert created is True

    async def test_concurrent_creates_for_one_vm_one_wins(self, make_store: MakeStore) -> None:
        a, results, winners = await race_for_one_vm(make_store, lambda store, i: store.create(saga(f"m-{i}", "vm-1")))
        assert len(winners) == 1
        assert {rec.migration_id for rec, _ in results} == {winners[0].migration_id}
        active = await a.active_for_vm("vm-1")
        assert active is not None and active.migration_id == winners[0].migration_id
        assert len(await a.list(vm_id="vm-1")) == 1

    async def test_concurrent_creates_same_id(self, make_store: MakeStore) -> None:
        a, b = await make_store(), await make_store()
        results = await asyncio.gather(*[(a if i % 2 else b).create(saga()) for i in range(10)])
        assert sum(created for _, created in results) == 1
        assert {rec.version for rec, _ in results} == {1}

    async def test_a_terminal_record_goes_in_beside_an_active_saga(self, store: SagaStore) -> None:
        # A rejection is recorded as a finished saga even while the VM has one running.
        await store.create(saga("m-1", "vm-1"))
        rejected, created = await store.create(
            saga("m-2", "vm-1", created_at=200.0, status="rejected")
        )
        assert created is True
        assert (rejected.migration_id, rejected.status) == ("m-2", "rejected")
        active = await store.active_for_vm("vm-1")
        assert active is not None and active.migration_id == "m-1"
        # ...but a replay of its id is still answered with the stored one
        again, created = await store.create(saga("m-2", "vm-9", status="rejected"))
        assert created is False and again.vm_id == "vm-1"

    @pytest.mark.parametrize("status", sorted(TERMINAL))
    async def test_terminal_saga_frees_the_vm(self, store: SagaStore, status: str) -> None:
        rec, _ = await store.create(saga("m-1", "vm-1"))
        rec.status = status
        await store.save(rec, owner=None)
        assert await store.active_for_vm("vm-1") is None
        new, created = await store.create(saga("m-2", "vm-1", created_at=200.0))
        assert created is True
        assert new.migration_id == "m-2"
        active = await store.active_for_vm("vm-1")
        assert active is not None and active.migration_id == "m-2"
        # the finished one is still there, by id
        old = await store.get("m-1")
        assert old is not None and old.status == status

    # --- save ---------------------------------------------------------------------------------

    async def test_save_bumps_the_version(self, store: SagaStore) -> None:
        rec, _ = await store.create(saga())
        rec.step = "prepare"
        rec.data["attempt"] = 1
        rec.updated_at = 150.0
        saved = await store.save(rec, owner=None)
        assert saved.version == 2
        fetched = await store.get("m-1")
        assert fetched is not None
        assert fetched.to_dict() == saved.to_dict()
        assert (fetched.step, fetched.data, fetched.updated_at) == (
            "prepare",
            {"attempt": 1},
            150.0,
        )

    async def test_save_stale_version_conflicts(self, store: SagaStore) -> None:
        rec, _ = await store.create(saga())
        await store.save(rec, owner=None)
        rec.step = "lost-update"
        with pytest.raises(Conflict):
            await store.save(rec, owner=None)  # still version 1; the store is at 2
        fetched = await store.get("m-1")
        assert fetched is not None and fetched.step == "admission" and fetched.version == 2

    async def test_save_unknown_saga_conflicts(self, store: SagaStore) -> None:
        with pytest.raises(Conflict):
            await store.save(saga("ghost"), owner=None)

    async def test_save_by_other_owner_conflicts(self, store: SagaStore) -> None:
        await store.create(saga())
        [rec] = await store.claim("replica-a", now=1000.0, lease_s=30.0)
        with pytest.raises(Conflict):
            await store.save(rec, owner="replica-b")
        saved = await store.save(rec, owner="replica-a")
        assert saved.version == rec.version + 1
        assert saved.owner == "replica-a"

    async def test_save_does_not_move_the_lease(self, store: SagaStore) -> None:
        await store.create(saga())
        [rec] = await store.claim("replica-a", now=1000.0, lease_s=30.0)
        rec.owner, rec.lease_until = "someone-else", 5.0
        saved = await store.save(rec, owner="replica-a")
        assert (saved.owner, saved.lease_until) == ("replica-a", 1030.0)
        fetched = await store.get("m-1")
        assert fetched is not None and (fetched.owner, fetched.lease_until) == ("replica-a", 1030.0)

    async def test_concurrent_saves_of_one_version_one_wins(self, make_store: MakeStore) -> None:
        a, b = await make_store(), await make_store()
        rec, _ = await a.create(saga())
        outcomes = await asyncio.gather(
            *[(a if i % 2 else b).save(rec, owner=None) for i in range(10)],
            return_exceptions=True,
        )
        assert sum(isinstance(o, SagaRecord) for o in outcomes) == 1
        assert all(isinstance(o, SagaRecord | Conflict) for o in outcomes)

    async def test_returned_records_are_copies(self, store: SagaStore) -> None:
        rec, _ = await store.create(saga(data={"a": 1}))
        rec.data["a"] = 2
        rec.history.append(HistoryEntry(1.0, "x", "note"))
        fetched = await store.get("m-1")
        assert fetched is not None and fetched.data == {"a": 1} and fetched.history == []

    # --- history and data round-trip --------------------------------------------------------

    async def test_history_and_data_round_trip(self, store: SagaStore) -> None:
        rec, _ = await store.create(saga())
        rec.history = [
            HistoryEntry(101.25, "admission", "started"),
            HistoryEntry(101.5, "admission", "succeeded", {"policy": "ok", "score": 0.1}),
            HistoryEntry(
                102.0,
                "transfer",
                "failed",
                {"error": {"code": "timeout", "retryable": True}, "hosts": ["a", "b"]},
            ),
            HistoryEntry(103.0, "transfer", "retry", {"note": 'Ünïcödé ✓ "quoted" \\ \''}),
        ]
        rec.data = {"bytes": 2**53, "ratio": 1 / 3, "neg": -0.5, "nested": {"l": [[], {}]}}
        saved = await store.save(rec, owner=None)
        fetched = await store.get("m-1")
        assert fetched is not None
        assert fetched.history == rec.history
        assert fetched.data == rec.data
        assert fetched.to_dict() == saved.to_dict()

    # --- list -------------------------------------------------------------------------------

    async def test_list_newest_first_and_limited(self, store: SagaStore) -> None:
        for i, t in enumerate([300.0, 100.0, 200.0, 400.0]):
            await store.create(saga(f"m-{i}", f"vm-{i}", created_at=t))
        listed = await store.list()
        assert [r.created_at for r in listed] == [400.0, 300.0, 200.0, 100.0]
        assert [r.migration_id for r in await store.list(limit=2)] == ["m-3", "m-0"]

    async def test_list_by_vm(self, store: SagaStore) -> None:
        rec, _ = await store.create(saga("m-1", "vm-1", created_at=100.0))
        rec.status = "completed"
        await store.save(rec, owner=None)
        await store.create(saga("m-2", "vm-1", created_at=200.0))
        await store.create(saga("m-3", "vm-2", created_at=300.0))
        assert [r.migration_id for r in await store.list(vm_id="vm-1")] == ["m-2", "m-1"]
        assert [r.migration_id for r in await store.list(vm_id="vm-2")] == ["m-3"]
        assert await store.list(vm_id="vm-9") == []

    async def test_list_empty(self, store: SagaStore) -> None:
        assert await store.list() == []

    # --- claim and renew --------------------------------------------------------------------

    async def test_claim_takes_unowned_sagas(self, store: SagaStore) -> None:
        await store.create(saga("m-1", "vm-1", created_at=100.0))
        await store.create(saga("m-2", "vm-2", created_at=200.0))
        claimed = await store.claim("replica-a", now=1000.0, lease_s=30.0)
        assert sorted(r.migration_id for r in claimed) == ["m-1", "m-2"]
        for r in claimed:
            assert (r.owner, r.lease_until, r.version) == ("replica-a", 1030.0, 2)
            fetched = await store.get(r.migration_id)
            assert fetched is not None and fetched.to_dict() == r.to_dict()

    async def test_claim_respects_a_live_foreign_lease(self, store: SagaStore) -> None:
        await store.create(saga())
        await store.claim("replica-a", now=1000.0, lease_s=30.0)
        assert await store.claim("replica-b", now=1010.0, lease_s=30.0) == []
        fetched = await store.get("m-1")
        assert fetched is not None and fetched.owner == "replica-a" and fetched.version == 2

    async def test_claim_takes_an_expired_lease_and_fences_the_old_owner(
        self, store: SagaStore
    ) -> None:
        await store.create(saga())
        [held] = await store.claim("replica-a", now=1000.0, lease_s=30.0)
        [taken] = await store.claim("replica-b", now=1031.0, lease_s=30.0)
        assert (taken.owner, taken.lease_until) == ("replica-b", 1061.0)
        assert taken.version > held.version
        held.step = "stale-write"
        with pytest.raises(Conflict):
            await store.save(held, owner="replica-a")
        assert await store.renew("m-1", "replica-a", until=2000.0) is False

    async def test_the_holder_renews_rather_than_claims(self, store: SagaStore) -> None:
        # claiming its own live saga again would bump the version under the driving task
        await store.create(saga())
        await store.claim("replica-a", now=1000.0, lease_s=30.0)
        assert await store.claim("replica-a", now=1010.0, lease_s=30.0) == []
        [again] = await store.claim("replica-a", now=1031.0, lease_s=30.0)
        assert (again.owner, again.lease_until) == ("replica-a", 1061.0)

    async def test_claim_skips_terminal_sagas(self, store: SagaStore) -> None:
        for i, status in enumerate(sorted(TERMINAL)):
            rec, _ = await store.create(saga(f"m-{i}", f"vm-{i}"))
            rec.status = status
            await store.save(rec, owner=None)
        rec, _ = await store.create(saga("m-c", "vm-c"))
        rec.status = "compensating"
        await store.save(rec, owner=None)
        claimed = await store.claim("replica-a", now=1000.0, lease_s=30.0)
        assert [r.migration_id for r in claimed] == ["m-c"]

    async def test_claim_limit(self, store: SagaStore) -> None:
        for i in range(5):
            await store.create(saga(f"m-{i}", f"vm-{i}", created_at=100.0 + i))
        first = await store.claim("replica-a", now=1000.0, lease_s=30.0, limit=2)
        assert len(first) == 2
        rest = await store.claim("replica-b", now=1000.0, lease_s=30.0)
        assert len(rest) == 3
        assert {r.migration_id for r in first}.isdisjoint(r.migration_id for r in rest)

    async def test_concurrent_claims_split_the_work(self, make_store: MakeStore) -> None:
        a, b = await make_store(), await make_store()
        for i in range(20):
            await a.create(saga(f"m-{i}", f"vm-{i}", created_at=100.0 + i))
        got_a, got_b = await asyncio.gather(
            a.claim("replica-a", now=1000.0, lease_s=30.0),
            b.claim("replica-b", now=1000.0, lease_s=30.0),
        )
        ids_a = {r.migration_id for r in got_a}
        ids_b = {r.migration_id for r in got_b}
        assert ids_a.isdisjoint(ids_b)
        assert ids_a | ids_b == {f"m-{i}" for i in range(20)}
        for r in await a.list(limit=100):
            assert r.owner == ("replica-a" if r.migration_id in ids_a else "replica-b")

    async def test_renew(self, store: SagaStore) -> None:
        await store.create(saga())
        [rec] = await store.claim("replica-a", now=1000.0, lease_s=30.0)
        assert await store.renew("m-1", "replica-a", until=1100.0) is True
        fetched = await store.get("m-1")
        assert fetched is not None and fetched.lease_until == 1100.0
        # renewing does not invalidate the holder's copy
        assert fetched.version == rec.version
        await store.save(rec, owner="replica-a")
        # a renewed lease is live: nobody else can claim it at a time the old one had expired
        assert await store.claim("replica-b", now=1050.0, lease_s=30.0) == []

    async def test_renew_by_non_owner_fails(self, store: SagaStore) -> None:
        await store.create(saga())
        assert await store.renew("m-1", "replica-a", until=1100.0) is False  # unowned
        await store.claim("replica-a", now=1000.0, lease_s=30.0)
        assert await store.renew("m-1", "replica-b", until=1100.0) is False
        assert await store.renew("ghost", "replica-a", until=1100.0) is False
        fetched = await store.get("m-1")
        assert fetched is not None and fetched.lease_until == 1030.0

    # --- cancel -----------------------------------------------------------------------------

    async def test_request_cancel_is_merged_into_the_next_save(self, store: SagaStore) -> None:
        await store.create(saga())
        [rec] = await store.claim("replica-a", now=1000.0, lease_s=30.0)
        cancelled = await store.request_cancel("m-1")
        assert cancelled is not None and cancelled.cancel_requested is True
        assert cancelled.version == rec.version  # no bump: the driver must not conflict
        rec.step = "transfer"  # the driver's copy predates the request
        assert rec.cancel_requested is False
        saved = await store.save(rec, owner="replica-a")
        assert saved.cancel_requested is True
        assert saved.step == "transfer"
        fetched = await store.get("m-1")
        assert fetched is not None and fetched.cancel_requested is True

    async def test_request_cancel_unknown_is_none(self, store: SagaStore) -> None:
        assert await store.request_cancel("ghost") is None

    async def test_request_cancel_of_a_finished_saga_changes_nothing(
        self, store: SagaStore
    ) -> None:
        rec, _ = await store.create(saga())
        rec.status = "completed"
        done = await store.save(rec, owner=None)
        got = await store.request_cancel("m-1")
        assert got is not None
        assert got.cancel_requested is False
        assert got.to_dict() == done.to_dict()

    # --- spans ------------------------------------------------------------------------------

    async def test_a_cancelled_write_leaves_the_store_usable(self, store: SagaStore) -> None:
        """A coordinator being stopped cancels its sagas wherever they are, also inside a
        write: the write then happened whole or not at all, and the next one works."""
        await store.create(saga())
        for n in range(40):
            task = asyncio.create_task(store.add_spans("m-1", [{"n": n}, {"n": n}]))
            await asyncio.sleep(n * 0.00005)  # cancelled at a different point each time
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await store.add_spans("m-2", [{"n": n}])
            spans = [s["n"] for s in await store.spans("m-1")]
            assert spans.count(n) in (0, 2), spans
        assert [s["n"] for s in await store.spans("m-2")] == list(range(40))

    async def test_spans_keep_their_order_per_migration(self, store: SagaStore) -> None:
        await store.create(saga())
        first = [{"name": "admission", "start": 1.0, "end": 2.0, "attrs": {"vm": "vm-1"}}]
        second = [{"name": "transfer", "start": 2.0, "end": 5.5}, {"name": "switch", "n": 3}]
        await store.add_spans("m-1", first)
        await store.add_spans("m-1", second)
        await store.add_spans("m-2", [{"name": "other"}])
        await store.add_spans("m-1", [])
        assert await store.spans("m-1") == first + second
        assert await store.spans("m-2") == [{"name": "other"}]
        assert await store.spans("ghost") == []
