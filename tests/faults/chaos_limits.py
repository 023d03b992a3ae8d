"""The fleet queue's limits, checked afterwards from the store's history: every started entry
holds its slot from ``started_at`` to ``ended_at``; at no instant may more be held than the
limits allow (cluster-wide, outbound per source, inbound per target)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ferry_coordinator.fleet.queue import Limits, QueueEntry
from ferry_coordinator.store import open_store


async def limit_violations(db: Path) -> list[str]:
    """What exceeded a limit, from the queue kept in the SQLite saga store at ``db``
    (nothing to check when no migration went through the queue)."""
    if not db.exists():  # noqa: ASYNC240 - once, after the run
        return []
    store = await open_store(f"sqlite:///{db}")
    try:
        limits = await store.queue.limits()
        entries = [e for e in await store.queue.entries() if e.started_at is not None]
    finally:
        close = getattr(store, "close", None)
        if close is not None:
            await close()
    return exceeded(entries, limits)


def exceeded(entries: Sequence[QueueEntry], limits: Limits) -> list[str]:
    """Every instant at which the slots held (``started_at`` to ``ended_at``) exceeded a limit."""
    entries = [e for e in entries if e.started_at is not None]
    # sweep over start and end instants; an end at the same instant as a start frees first
    points = sorted([(e.started_at or 0.0, 1, e) for e in entries] +
                    [(e.ended_at if e.ended_at is not None else float("inf"), -1, e) for e in entries],
                    key=lambda p: (p[0], p[1]))
    total, out_, in_ = 0, Counter[str](), Counter[str]()
    bad: list[str] = []
    for at, delta, e in points:
        total += delta
        out_[e.source_host] += delta
        in_[e.target_host or "?"] += delta
        if delta < 0:
            continue
        if total > limits.cluster:
            bad.append(f"{total} in flight > cluster limit {limits.cluster} at {at:.3f}")
        if out_[e.source_host] > limits.outbound_per_host:
            bad.append(f"{out_[e.source_host]} out of {e.source_host} > {limits.outbound_per_host} at {at:.3f}")
        if in_[e.target_host or "?"] > limits.inbound_per_host:
            bad.append(f"{in_[e.target_host or '?']} into {e.target_host} > {limits.inbound_per_host} at {at:.3f}")
    return bad
