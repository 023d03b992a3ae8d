"""The balancer's one row in the saga store: who leads, until when, and what it keeps.

One active balancer per cluster: a replica leads while it holds the row's lease (``owner``,
``lease_until``, compared on wall-clock time as the sagas' leases are) and renews it each
round; when it dies, another takes the lease once it runs out. Every write is a
compare-and-set on ``version``: a leader that lost its lease meanwhile (paused, then woke)
cannot overwrite its successor's state, so a cooldown or a recommendation is never lost and a
move is never repeated. The row's body is JSON (:class:`Doc`): the balancer's state, the
current recommendations, the cluster's automation level.

The row lives in the saga store (``store.balancer``, :mod:`ferry_coordinator.store.ledger`),
on every backend.
"""

from __future__ import annotations

from ..store.ledger import Doc, Ledger

__all__ = ["Doc", "Ledger", "acquire"]


async def acquire(ledger: Ledger, owner: str, *, now: float, lease_s: float) -> Doc | None:
    """Take or renew the lease for ``owner``: the row as it now is, or None if another holds it."""
    doc = await ledger.read()
    if doc.owner not in (None, owner) and doc.lease_until > now:
        return None
    new = Doc(owner, now + lease_s, doc.version + 1, doc.body)
    return new if await ledger.write(new, expect=doc.version) else None
