"""Which queued migrations' followers must hear ``migration.queued`` now.

A follower hears it when its migration enters the queue with a reason, and again whenever the
reason changes (issue 15); not on every pass of the coordinator over the queue. Kept in memory:
a replica taking over tells every follower once more, which is harmless (the event carries the
current reason, not a delta).
"""

from __future__ import annotations

from collections.abc import Iterable

from .queue import Decision, Reason


class ReasonLog:
    def __init__(self) -> None:
        self._told: dict[str, Reason | None] = {}

    def changes(self, decisions: Iterable[Decision]) -> list[Decision]:
        """Of the current plan (``FleetQueue.explain``), the entries whose followers must be
        told: held for a reason they have not heard yet. Entries no longer queued are forgotten;
        one about to start (no reason) is remembered but not announced (its ``accepted`` follows)."""
        now: dict[str, Reason | None] = {}
        out: list[Decision] = []
        for d in decisions:
            mid = d.entry.migration_id
            now[mid] = d.reason
            if d.reason is not None and (mid not in self._told or self._told[mid] is not d.reason):
                out.append(d)
        self._told = now
        return out
