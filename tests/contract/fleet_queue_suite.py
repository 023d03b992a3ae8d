"""The fleet queue contract: every saga store's ``queue`` runs this suite unchanged.

It is mixed into :class:`~tests.contract.store_suite.SagaStoreSuite`, so each backend's test
class (memory, SQLite, PostgreSQL) runs it with its own ``make_store``; two handles are two
connections onto one storage, as two coordinator replicas would have.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

import pytest

from ferry_coordinator.fleet.queue import (
    EntryState,
    Limits,
    Priority,
    QueueEntry,
    Reason,
    new_entry,
)
from ferry_coordinator.store import SagaRecord, SagaStore

MakeStore = Callable[[], Awaitable[SagaStore]]
T = TypeVar("T")


async def race_for_one_vm(
    make_store: MakeStore, attempt: Callable[[SagaStore, int], Awaitable[tuple[T, bool]]]
) -> tuple[SagaStore, list[tuple[T, bool]], list[T]]:
    """Twenty attempts at once (``attempt(store, i)``), from two handles on one store in turn:
    one handle, every ``(result, created)``, and the results that were created."""
    a, b = await make_store(), await make_store()
    results = await asyncio.gather(*[attempt(a if i % 2 else b, i) for i in range(20)])
    return a, results, [x for x, created in results if created]
STARTED = {EntryState.STARTED}


def entry(
    mid: str,
    source: str = "host-a",
    candidates: Sequence[str] = ("host-b",),
    *,
    at: float = 100.0,
    priority: Priority = Priority.OPERATOR,
    group: str | None = None,
    vm: str | None = None,
) -> QueueEntry:
    return new_entry(
        mid, vm or f"vm-{mid}", source, candidates, priority=priority, group=group, now=at,
        request={"reason": "test", "params": {"k": 1}},
    )


def check_limits(started: Iterable[QueueEntry], limits: Limits) -> tuple[int, int, int]:
    """Assert the slots held are within ``limits``; the highest use of each kind."""
    held = list(started)
    out = Counter(e.source_host for e in held)
    inn = Counter(e.target_host for e in held)
    assert len(held) <= limits.cluster, held
    assert max(out.values(), default=0) <= limits.outbound_per_host, out
    assert max(inn.values(), default=0) <= limits.inbound_per_host, inn
    return len(held), max(out.values(), default=0), max(inn.values(), default=0)


async def claim_all(store: SagaStore, now: float, owner: str = "r1") -> list[QueueEntry]:
    out = []
    while (got := await store.queue.claim_next(owner, now=now)) is not None:
        out.append(got)
    return out


class FleetQueueSuite:
    """Abstract: the ``store`` and ``make_store`` fixtures come from the backend's class."""

    # --- limits -----------------------------------------------------------------------------

    async def test_default_limits_follow_the_anchors(self, store: SagaStore) -> None:
        assert await store.queue.limits() == Limits(
            cluster=5, outbound_per_host=2, inbound_per_host=2, automatic=1
        )

    async def test_limits_change_at_run_time_for_every_handle(self, make_store: MakeStore) -> None:
        a, b = await make_store(), await make_store()
        await a.queue.set_limits(Limits(cluster=1, outbound_per_host=1, inbound_per_host=1, ageing_s=30))
        assert await b.queue.limits() == Limits(1, 1, 1, 30.0, 1)
        for i in range(3):
            await a.queue.enqueue(entry(f"m-{i}", f"src-{i}", [f"dst-{i}"]))
        assert len(await claim_all(b, 100.0)) == 1
        await b.queue.set_limits(Limits(cluster=3))
        assert len(await claim_all(a, 100.0)) == 2
        # lowered below what is held: nothing more starts, nothing held is taken back
        await a.queue.set_limits(Limits(cluster=2))
        await a.queue.enqueue(entry("m-9", "src-9", ["dst-9"]))
        assert await b.queue.claim_next("r2", now=101.0) is None
        assert len(await a.queue.entries(states=STARTED)) == 3

    def test_limits_refuse_nonsense(self) -> None:
        with pytest.raises(ValueError):
            Limits(cluster=0)
        with pytest.raises(ValueError):
            Limits(ageing_s=0)

    # --- enqueue ------------------------------------------------------------------------------

    async def test_enqueue_round_trips_and_is_idempotent_by_id(self, store: SagaStore) -> None:
        first, created = await store.queue.enqueue(entry("m-1", candidates=["host-b", "host-c"]))
        assert created is True and first.state is EntryState.QUEUED
        assert await store.queue.get("m-1") == first
        again, created = await store.queue.enqueue(entry("m-1", "host-z", ["host-y"], vm="vm-other"))
        assert created is False and again == first
        assert first.request == {"reason": "test", "params": {"k": 1}}
        assert first.candidates == ("host-b", "host-c") and first.group == "host-a"
        assert await store.queue.get("ghost") is None

    async def test_one_live_entry_per_vm(self, store: SagaStore) -> None:
        await store.queue.enqueue(entry("m-1", vm="vm-1"))
        other, created = await store.queue.enqueue(entry("m-2", vm="vm-1", at=200.0))
        assert created is False and other.migration_id == "m-1"
        assert await store.queue.get("m-2") is None
        [started] = await claim_all(store, 100.0)
        _, created = await store.queue.enqueue(entry("m-3", vm="vm-1", at=300.0))
        assert created is False  # still live while it holds its slot
        await store.queue.release(started.migration_id, now=150.0)
        _, created = await store.queue.enqueue(entry("m-3", vm="vm-1", at=300.0))
        assert created is True

    async def test_concurrent_enqueues_for_one_vm_one_wins(self, make_store: MakeStore) -> None:
        _, results, winners = await race_for_one_vm(
            make_store, lambda store, i: store.queue.enqueue(entry(f"m-{i}", vm="vm-1"))
        )
        assert len(winners) == 1
        assert {e.migration_id for e, _ in results} == {winners[0].migration_id}

    # --- claim: order ---------------------------------------------------------------------------

    async def test_claim_takes_a_slot_on_the_first_candidate_with_room(self, store: SagaStore) -> None:
        await store.queue.set_limits(Limits(cluster=5, outbound_per_host=5, inbound_per_host=1))
        await store.queue.enqueue(entry("m-1", "host-a", ["host-b", "host-c"], at=100.0))
        await store.queue.enqueue(entry("m-2", "host-a", ["host-b", "host-c"], at=101.0))
        one, two = await claim_all(store, 200.0, owner="replica-a")
        assert (one.migration_id, one.target_host, one.state) == ("m-1", "host-b", EntryState.STARTED)
        assert (one.owner, one.started_at) == ("replica-a", 200.0)
        assert (two.migration_id, two.target_host) == ("m-2", "host-c")
        assert await store.queue.get("m-1") == one

    async def test_priority_order(self, store: SagaStore) -> None:
        await store.queue.set_limits(Limits(cluster=1))
        for i, p in enumerate([Priority.REBALANCE, Priority.OPERATOR, Priority.DRAIN, Priority.EVACUATION]):
            await store.queue.enqueue(entry(p.name.lower(), f"src-{i}", [f"dst-{i}"], priority=p, at=100.0 + i))
        order = []
        for t in range(4):
            got = await store.queue.claim_next("r1", now=110.0 + t)
            assert got is not None
            assert await store.queue.claim_next("r1", now=110.0 + t) is None  # cluster limit 1
            order.append(got.migration_id)
            await store.queue.release(got.migration_id, now=110.5 + t)
        assert order == ["evacuation", "drain", "operator", "rebalance"]

    async def test_a_drain_goes_ahead_of_twenty_queued_operator_requests(self, store: SagaStore) -> None:
        await store.queue.set_limits(Limits(cluster=1, outbound_per_host=10, inbound_per_host=10))
        for i in range(20):
            await store.queue.enqueue(entry(f"op-{i:02}", f"src-{i}", ["dst"], at=100.0 + i))
        await store.queue.enqueue(entry("drain-1", "drained", ["dst"], priority=Priority.DRAIN, at=200.0))
        got = await store.queue.claim_next("r1", now=201.0)
        assert got is not None and got.migration_id == "drain-1"
        reasons = {d.entry.migration_id: d.reason for d in await store.queue.explain(now=201.0)}
        assert set(reasons.values()) == {Reason.CLUSTER_LIMIT} and len(reasons) == 20

    async def test_fair_share_between_two_groups_within_a_priority(self, store: SagaStore) -> None:
        await store.queue.set_limits(Limits(cluster=4, outbound_per_host=4, inbound_per_host=4))
        # drain A asked first for all its VMs; FIFO alone would give it every slot
        for i in range(10):
            await store.queue.enqueue(entry(f"a-{i}", "host-a", [f"t-{i % 5}"], priority=Priority.DRAIN, group="drain-a", at=100.0 + i))
        for i in range(10):
            await store.queue.enqueue(entry(f"b-{i}", "host-b", [f"t-{i % 5}"], priority=Priority.DRAIN, group="drain-b", at=200.0 + i))
        got = await claim_all(store, 300.0)
        assert Counter(e.group for e in got) == {"drain-a": 2, "drain-b": 2}
        # within a group, first come first served
        assert sorted(e.migration_id for e in got) == ["a-0", "a-1", "b-0", "b-1"]
        await store.queue.release("a-0", now=301.0)
        await store.queue.release("a-1", now=301.0)
        await store.queue.release("b-0", now=301.0)
        got = await claim_all(store, 302.0)
        # a holds 0, b holds 1: a gets the next slot, then they alternate; within one of each other
        assert [e.migration_id for e in got] == ["a-2", "a-3", "b-2"]
        held = Counter(e.group for e in await store.queue.entries(states=STARTED))
        assert held == {"drain-a": 2, "drain-b": 2}

    async def test_automatic_migrations_are_bounded_apart(self, store: SagaStore) -> None:
        # a balancer never storms: one automatic move in flight by default, whatever room is left
        await store.queue.set_limits(Limits(cluster=5, outbound_per_host=5, inbound_per_host=5))
        for i in range(3):
            await store.queue.enqueue(entry(f"auto-{i}", f"s{i}", [f"t{i}"], priority=Priority.REBALANCE, at=1.0 + i))
        await store.queue.enqueue(entry("op", "s9", ["t9"], at=9.0))
        assert {e.migration_id for e in await claim_all(store, 10.0)} == {"auto-0", "op"}
        reasons = {d.entry.migration_id: d.reason for d in await store.queue.explain(now=10.0)}
        assert reasons == {"auto-1": Reason.AUTOMATIC_LIMIT, "auto-2": Reason.AUTOMATIC_LIMIT}
        await store.queue.release("auto-0", now=11.0)
        assert [e.migration_id for e in await claim_all(store, 12.0)] == ["auto-1"]

    @staticmethod
    async def old_operator_and_new_drain(store: SagaStore, ageing_s: float) -> None:
        """One slot; an operator request at 0 s and a drain's (one level higher) at 100 s."""
        await store.queue.set_limits(Limits(cluster=1, ageing_s=ageing_s))
        await store.queue.enqueue(entry("old-op", "src-1", ["dst-1"], at=0.0))
        await store.queue.enqueue(entry("new-drain", "src-2", ["dst-2"], priority=Priority.DRAIN, at=100.0))

    async def test_ageing_lets_a_long_wait_overtake_a_higher_priority(self, store: SagaStore) -> None:
        await self.old_operator_and_new_drain(store, ageing_s=60.0)
        # at 110 the operator request has waited 110 s: one level up, equal to the drain; older wins
        got = await store.queue.claim_next("r1", now=110.0)
        assert got is not None and got.migration_id == "old-op"

    async def test_without_ageing_the_higher_priority_goes_first(self, store: SagaStore) -> None:
        await self.old_operator_and_new_drain(store, ageing_s=1000.0)
        got = await store.queue.claim_next("r1", now=110.0)
        assert got is not None and got.migration_id == "new-drain"

    # --- reasons ----------------------------------------------------------------------------------

    async def test_every_queued_entry_is_explained(self, store: SagaStore) -> None:
        q = store.queue
        await q.set_limits(Limits(cluster=3, outbound_per_host=1, inbound_per_host=1))
        await q.enqueue(entry("e1", "a", ["b"], at=1.0))
        await q.enqueue(entry("e2", "a", ["c"], at=2.0))
        await q.enqueue(entry("e3", "d", ["b"], at=3.0))
        await q.enqueue(entry("e4", "e", [], at=4.0))
        await q.enqueue(entry("e5", "f", ["g"], at=5.0))
        assert await q.update_queued("e5", policy_block="maintenance window") is not None
        await q.enqueue(entry("e6", "h", ["i"], at=6.0))
        await q.enqueue(entry("e7", "j", ["k"], at=7.0))
        await q.enqueue(entry("e8", "l", ["m"], at=8.0))
        expected = {
            "e1": None, "e2": Reason.SOURCE_OUTBOUND, "e3": Reason.TARGET_INBOUND,
            "e4": Reason.NO_CAPACITY, "e5": Reason.POLICY_BLOCKED, "e6": None, "e7": None,
            "e8": Reason.CLUSTER_LIMIT,
        }
        assert {d.entry.migration_id: d.reason for d in await q.explain(now=10.0)} == expected
        assert [e.migration_id for e in await claim_all(store, 10.0)] == ["e1", "e6", "e7"]
        after = {d.entry.migration_id: d.reason for d in await q.explain(now=10.0)}
        assert after == {k: v for k, v in expected.items() if v is not None}
        # a slot frees: the reasons change with it
        await q.release("e1", now=11.0)
        after = {d.entry.migration_id: d.reason for d in await q.explain(now=11.0)}
        # e2 takes the freed slot first (older), so e3 is now held by the cluster limit
        assert after["e2"] is None and after["e3"] is Reason.CLUSTER_LIMIT
        held = await q.update_queued("e4", candidates=[], placement_note="z: insufficient memory")
        assert held is not None and held.placement_note == "z: insufficient memory"
        assert (await q.get("e4")) == held
        freed = await q.update_queued("e4", candidates=["z"])
        assert freed is not None and freed.candidates == ("z",) and freed.placement_note is None
        await q.update_queued("e5", clear_policy_block=True)
        await q.release("e6", now=12.0)
        await q.release("e7", now=12.0)
        started = {e.migration_id for e in await claim_all(store, 12.0)}
        assert started == {"e2", "e3", "e4"}
        after = {d.entry.migration_id: d.reason for d in await q.explain(now=12.0)}
        assert after == {"e5": Reason.CLUSTER_LIMIT, "e8": Reason.CLUSTER_LIMIT}

    async def test_update_refuses_the_source_as_a_target(self, store: SagaStore) -> None:
        await store.queue.enqueue(entry("m-1", "host-a", ["host-b"]))
        with pytest.raises(ValueError):
            await store.queue.update_queued("m-1", candidates=["host-a"])
        got = await store.queue.get("m-1")
        assert got is not None and got.candidates == ("host-b",)

    # --- cancel, release, idempotence -----------------------------------------------------------

    async def test_a_cancelled_entry_never_starts_and_keeps_its_id(self, store: SagaStore) -> None:
        await store.queue.enqueue(entry("m-1"))
        cancelled = await store.queue.cancel("m-1", now=150.0)
        assert cancelled is not None and cancelled.state is EntryState.CANCELLED
        assert cancelled.ended_at == 150.0
        assert await store.queue.claim_next("r1", now=160.0) is None
        again, created = await store.queue.enqueue(entry("m-1"))
        assert created is False and again.state is EntryState.CANCELLED
        assert await store.queue.claim_next("r1", now=170.0) is None
        assert await store.queue.explain(now=170.0) == []
        assert await store.queue.cancel("ghost", now=170.0) is None

    async def test_cancel_of_a_started_entry_changes_nothing(self, store: SagaStore) -> None:
        await store.queue.enqueue(entry("m-1"))
        started = await store.queue.claim_next("r1", now=100.0)
        assert await store.queue.cancel("m-1", now=101.0) == started

    async def test_release_is_idempotent_and_frees_the_slot(self, store: SagaStore) -> None:
        await store.queue.set_limits(Limits(cluster=1))
        await store.queue.enqueue(entry("m-1", "s1", ["t1"], at=1.0))
        await store.queue.enqueue(entry("m-2", "s2", ["t2"], at=2.0))
        assert [e.migration_id for e in await claim_all(store, 10.0)] == ["m-1"]
        done = await store.queue.release("m-1", now=20.0)
        assert done is not None and (done.state, done.ended_at) == (EntryState.DONE, 20.0)
        assert await store.queue.release("m-1", now=30.0) == done
        assert await store.queue.release("ghost", now=30.0) is None
        assert [e.migration_id for e in await claim_all(store, 31.0)] == ["m-2"]
        # a released entry is never started again, nor re-queued by its id
        again, created = await store.queue.enqueue(entry("m-1", "s1", ["t1"]))
        assert created is False and again.state is EntryState.DONE

    @pytest.mark.parametrize("status", ["completed", "rolled_back", "rejected"])
    async def test_a_saga_ending_frees_its_slot(self, store: SagaStore, status: str) -> None:
        await store.queue.set_limits(Limits(cluster=1))
        await store.queue.enqueue(entry("m-1", "host-a", ["host-b"], at=1.0))
        await store.queue.enqueue(entry("m-2", "host-c", ["host-d"], at=2.0))
        [held] = await claim_all(store, 10.0)
        rec, _ = await store.create(SagaRecord("m-1", held.vm_id, "host-a", "host-b", created_at=10.0, updated_at=10.0))
        rec.step = "transfer"
        rec = await store.save(rec, owner=None)
        assert (await store.queue.get("m-1")) == held  # a running saga keeps its slot
        rec.status, rec.updated_at = status, 42.0
        await store.save(rec, owner=None)
        freed = await store.queue.get("m-1")
        assert freed is not None and (freed.state, freed.ended_at) == (EntryState.DONE, 42.0)
        assert [e.migration_id for e in await claim_all(store, 50.0)] == ["m-2"]

    async def test_a_saga_recorded_as_rejected_frees_its_slot(self, store: SagaStore) -> None:
        await store.queue.enqueue(entry("m-1"))
        [held] = await claim_all(store, 10.0)
        await store.create(SagaRecord("m-1", held.vm_id, "host-a", "host-b", status="rejected", updated_at=11.0))
        freed = await store.queue.get("m-1")
        assert freed is not None and freed.state is EntryState.DONE

    async def test_entries_by_state_and_group(self, store: SagaStore) -> None:
        await store.queue.enqueue(entry("m-2", "a", ["x"], group="drain-1", at=2.0))
        await store.queue.enqueue(entry("m-1", "a", ["y"], group="drain-1", at=1.0))
        await store.queue.enqueue(entry("m-3", "b", ["x"], at=3.0))
        await store.queue.claim_next("r1", now=5.0)
        assert [e.migration_id for e in await store.queue.entries(group="drain-1")] == ["m-1", "m-2"]
        assert [e.migration_id for e in await store.queue.entries(states=STARTED)] == ["m-1"]
        assert [e.migration_id for e in await store.queue.entries()] == ["m-1", "m-2", "m-3"]

    # --- races ------------------------------------------------------------------------------------

    async def test_a_claim_cut_short_takes_its_slot_whole_or_not_at_all(self, store: SagaStore) -> None:
        """A coordinator killed inside a claim: the claim happened whole or not at all, and the
        slots held (told to the claimer or not) stay within the limits."""
        limits = Limits(cluster=3, outbound_per_host=3, inbound_per_host=3)
        await store.queue.set_limits(limits)
        for i in range(40):
            await store.queue.enqueue(entry(f"m-{i:02}", f"s{i % 4}", [f"t{i % 5}"], at=float(i)))
        told: set[str] = set()
        for n in range(40):
            task = asyncio.create_task(store.queue.claim_next("r1", now=100.0))
            await asyncio.sleep(n * 0.00005)  # cut at a different point each time
            task.cancel()
            try:
                got = await task
            except asyncio.CancelledError:
                got = None
            if got is not None:
                told.add(got.migration_id)
            held = await store.queue.entries(states=STARTED)
            check_limits(held, limits)
            assert told <= {e.migration_id for e in held}
            for e in held:  # free them again, so that claims keep happening
                await store.queue.release(e.migration_id, now=101.0)
            told.clear()
        await store.queue.enqueue(entry("m-last", "s9", ["t9"], at=99.0))
        assert await store.queue.claim_next("r1", now=102.0) is not None  # still usable

    async def test_many_concurrent_claimers_never_exceed_the_limits(self, make_store: MakeStore) -> None:
        a, b = await make_store(), await make_store()
        limits = Limits(cluster=5, outbound_per_host=2, inbound_per_host=2)
        await a.queue.set_limits(limits)
        hosts = [f"h{i}" for i in range(6)]
        n = 120
        rng = random.Random(15)

        async def producer() -> None:
            # new work, some of it urgent, arrives while replicas claim: a claim that planned
            # on an older picture would pick something else than one that sees it
            for i in range(n):
                src = hosts[i % 6]
                cands = [hosts[(i + 1) % 6], hosts[(i + 2) % 6]]
                prio = list(Priority)[min(3, i * 4 // n + rng.randrange(2))]  # rising urgency
                await (a if i % 2 else b).queue.enqueue(
                    entry(f"m-{i:03}", src, cands, at=float(i), group=src, priority=prio)
                )
                if i == 19:  # a backlog first; the rest arrives while the slots are in use
                    await full.wait()
                if i >= 20:
                    await asyncio.sleep(rng.random() * 0.002)

        claimed: list[str] = []
        # each slot as seen from outside: from after its claim committed to before its release
        # began, so inside the time the store held it; two of these overlapping is a breach
        held: list[tuple[float, float, QueueEntry]] = []
        peaks: list[tuple[int, int, int]] = []
        stop = asyncio.Event()
        # the first slots are kept until all five are taken, however slow the machine, so
        # that the limit is surely reached once (and the history shows it)
        holding: set[str] = set()
        full = asyncio.Event()

        async def claimer(k: int) -> None:
            handle = a if k % 2 else b
            while len(claimed) < n:
                got = await handle.queue.claim_next(f"replica-{k}", now=1000.0)
                if got is None:
                    await asyncio.sleep(0.005)
                    continue
                start = time.monotonic()
                claimed.append(got.migration_id)
                holding.add(got.migration_id)
                if len(holding) >= limits.cluster:
                    full.set()
                await asyncio.sleep(0.04 + rng.random() * 0.04)  # the migration runs
                if not full.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(full.wait(), 5.0)
                holding.discard(got.migration_id)
                held.append((start, time.monotonic(), got))
                await (b if k % 2 else a).queue.release(got.migration_id, now=1001.0)

        async def sampler() -> None:
            while not stop.is_set():
                peaks.append(check_limits(await a.queue.entries(states=STARTED), limits))
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(sampler())
        await asyncio.wait_for(asyncio.gather(producer(), *[claimer(k) for k in range(20)]), 120)
        stop.set()
        await watcher
        # each started exactly once
        assert len(claimed) == n and set(claimed) == {f"m-{i:03}" for i in range(n)}
        # the history, replayed: at each slot's start, what else was held
        in_use = [
            check_limits([o for s0, s1, o in held if s0 <= start < s1], limits)
            for start, _, _ in held
        ]
        # the limit was reached, not just kept (seen by the sampler or in the history)
        assert max(u[0] for u in in_use + peaks) == limits.cluster
        done = await a.queue.entries(states={EntryState.DONE})
        assert len(done) == n
