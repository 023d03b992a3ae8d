"""The host state store contract: every ``StateStore`` backend runs this suite unchanged.

A backend's test module subclasses :class:`StateStoreSuite` and overrides the ``state``
fixture with a fresh, empty store.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ferry_common.state import StateStore


class StateStoreSuite:
    """Abstract: subclass it (``TestXxxStateStore``) and override ``state``."""

    @pytest.fixture
    async def state(self) -> AsyncIterator[StateStore]:
        raise NotImplementedError("override state in the backend's test class")
        yield  # pragma: no cover - makes this an async generator like the overrides

    async def test_delete_through_forgets_the_head_of_a_queue(self, state: StateStore) -> None:
        await state.put_many("q", [(f"{i:012d}", i) for i in range(1, 11)])
        await state.delete_through("q", f"{7:012d}")
        assert [v for _, v in await state.items("q")] == [8, 9, 10]

    async def test_clear_forgets_one_namespace(self, state: StateStore) -> None:
        await state.put_many("q.vm1", [(f"{i:012d}", i) for i in range(100)])
        await state.put("q.vm2", "k", 1)
        await state.clear("q.vm1")
        assert await state.items("q.vm1") == []
        assert await state.items("q.vm2") == [("k", 1)]

    async def test_write_spans_namespaces_and_deletes(self, state: StateStore) -> None:
        await state.put("a", "old", 1)
        await state.write([("a", "k", 1), ("b", "k", [2]), ("b", "j", {"x": 3})], deletes=[("a", "old"), ("c", "none")])
        assert await state.items("a") == [("k", 1)]
        assert await state.items("b") == [("j", {"x": 3}), ("k", [2])]

    async def test_write_is_all_or_nothing(self, state: StateStore) -> None:
        await state.put("a", "keep", 1)
        with pytest.raises(TypeError):
            await state.write([("a", "k", 1), ("b", "k", {1, 2})], deletes=[("a", "keep")])
        assert await state.items("a") == [("keep", 1)]
        assert await state.items("b") == []

    async def test_a_cancelled_write_leaves_the_store_usable(self, state: StateStore) -> None:
        """A service being stopped cancels its tasks wherever they are, also inside a write:
        the write then happened whole or not at all, and the next one works."""
        for n in range(40):
            task = asyncio.create_task(state.write([("a", f"k{n}", n), ("b", f"k{n}", n)]))
            await asyncio.sleep(n * 0.00005)  # cancelled at a different point each time
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await state.put("c", "after", n)
            assert await state.get("c", "after") == n
            assert (await state.get("a", f"k{n}"), await state.get("b", f"k{n}")) in ((None, None), (n, n))

    async def test_missing_key_is_none(self, state: StateStore) -> None:
        assert await state.get("ns", "nope") is None
        assert await state.items("empty") == []

    @pytest.mark.parametrize(
        "value",
        [
            {"vm": "vm-1", "disks": [{"size": 10 * 2**30, "ratio": 0.25}], "ok": True},
            [1, "two", 3.5, None, False],
            'Ünïcödé ✓ "quoted" \\ \'',
            0,
            2**53,
            -1.5,
            True,
            {},
            [],
        ],
    )
    async def test_put_get_round_trip(self, state: StateStore, value: Any) -> None:
        await state.put("ns", "k", value)
        assert await state.get("ns", "k") == value

    async def test_put_replaces(self, state: StateStore) -> None:
        await state.put("ns", "k", {"v": 1})
        await state.put("ns", "k", {"v": 2})
        assert await state.get("ns", "k") == {"v": 2}
        assert await state.items("ns") == [("k", {"v": 2})]

    async def test_delete(self, state: StateStore) -> None:
        await state.put("ns", "a", 1)
        await state.put("ns", "b", 2)
        await state.delete("ns", "a")
        await state.delete("ns", "never-there")
        assert await state.get("ns", "a") is None
        assert await state.items("ns") == [("b", 2)]

    async def test_namespaces_are_separate(self, state: StateStore) -> None:
        await state.put("imports", "k", "import")
        await state.put("reservations", "k", "reservation")
        assert await state.get("imports", "k") == "import"
        assert await state.get("reservations", "k") == "reservation"
        await state.delete("imports", "k")
        assert await state.get("reservations", "k") == "reservation"
        assert await state.items("imports") == []

    async def test_items_sorted_by_key(self, state: StateStore) -> None:
        for key in ["000010", "000002", "000001", "b", "a", "B"]:
            await state.put("q", key, key)
        keys = [k for k, _ in await state.items("q")]
        assert keys == ["000001", "000002", "000010", "B", "a", "b"]
        assert all(k == v for k, v in await state.items("q"))

    async def test_put_many(self, state: StateStore) -> None:
        await state.put("q", "000001", "old")
        await state.put_many("q", [(f"{i:06d}", {"seq": i}) for i in range(1, 101)])
        items = await state.items("q")
        assert len(items) == 100
        assert items[0] == ("000001", {"seq": 1})
        assert items[-1] == ("000100", {"seq": 100})
        await state.put_many("q", [])
        assert len(await state.items("q")) == 100

    async def test_put_many_accepts_a_generator(self, state: StateStore) -> None:
        await state.put_many("q", ((str(i), i) for i in range(3)))
        assert await state.items("q") == [("0", 0), ("1", 1), ("2", 2)]

    async def test_put_many_later_duplicate_wins(self, state: StateStore) -> None:
        await state.put_many("q", [("k", 1), ("k", 2)])
        assert await state.get("q", "k") == 2

    async def test_unjsonable_values_are_refused(self, state: StateStore) -> None:
        with pytest.raises(TypeError):
            await state.put("ns", "k", {1, 2})
        with pytest.raises(TypeError):
            await state.put("ns", "k", object())
        assert await state.get("ns", "k") is None

    async def test_put_many_is_all_or_nothing(self, state: StateStore) -> None:
        with pytest.raises(TypeError):
            await state.put_many("q", [("a", 1), ("b", object()), ("c", 3)])
        assert await state.items("q") == []

    async def test_values_are_copies(self, state: StateStore) -> None:
        value: dict[str, Any] = {"events": [1]}
        await state.put("ns", "k", value)
        value["events"].append(2)
        got = await state.get("ns", "k")
        assert got == {"events": [1]}
        got["events"].append(3)
        assert await state.get("ns", "k") == {"events": [1]}

    async def test_replayed_request_gets_the_same_answer(self, state: StateStore) -> None:
        # The idempotency pattern host services build on this store.
        async def handle(request_id: str) -> dict[str, Any]:
            cached = await state.get("answers", request_id)
            if cached is not None:
                return dict(cached)
            answer = {"reservation": f"r-{len(await state.items('answers'))}"}
            await state.put("answers", request_id, answer)
            return answer

        first = await handle("req-1")
        assert await handle("req-1") == first
        assert await handle("req-2") != first

    async def test_large_batch(self, state: StateStore) -> None:
        events = [(f"{i:08d}", {"type": "vm.event", "seq": i}) for i in range(100_000)]
        await state.put_many("frozen", events)
        items = await state.items("frozen")
        assert len(items) == 100_000
        assert items[12345] == ("00012345", {"type": "vm.event", "seq": 12345})
