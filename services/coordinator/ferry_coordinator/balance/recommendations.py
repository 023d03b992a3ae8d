"""The recommendations a balancer has published, and when they go stale.

A recommendation's id is a hash of its move and of the inventory version it was computed on:
the same move proposed again on the same inventory (the next round, or another replica after
a takeover) is the same recommendation, published once. When the inventory changes, every
recommendation computed on another version is superseded; one can be applied only while it
is current.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from ferry_common.clock import Clock, SystemClock
from ferry_common.messages.recommendations import (
    AutomationLevel,
    MoveReason,
    Recommendation,
    RecommendationEvent,
)

from .balancer import Proposal


class RecommendationError(LookupError):
    """A recommendation that cannot be applied: unknown, or superseded (not retryable as is:
    the balancer's next evaluation computes a fresh one)."""


def recommendation_id(version: str, vm_id: str, source: str, target: str) -> str:
    digest = hashlib.sha256(f"{version}|{vm_id}|{source}|{target}".encode()).hexdigest()
    return f"rec-{digest[:20]}"


def recommendation(p: Proposal, level: AutomationLevel, version: str, at: float) -> Recommendation:
    m = p.move
    return Recommendation(
        id=recommendation_id(version, m.vm_id, m.source, m.target),
        vm_id=m.vm_id, source_host=m.source, target_host=m.target,
        reason=MoveReason(kind=p.kind, policy=p.policy, level=level, figures=p.figures()),
        inventory_version=version, created_at=at,
    )


class RecommendationBook:
    """Current recommendations by id; every change comes back as the events to publish."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or SystemClock()
        self._current: dict[str, Recommendation] = {}

    def restore(self, recs: Iterable[Recommendation]) -> None:
        """Start from ``recs`` (the book as the saga store kept it)."""
        self._current = {r.id: r for r in recs}

    def current(self) -> list[Recommendation]:
        return sorted(self._current.values(), key=lambda r: (r.created_at, r.id))

    def offer(self, recs: Iterable[Recommendation]) -> list[RecommendationEvent]:
        """Add recommendations; only those not already current are ``created``."""
        now = self.clock.now()
        out = []
        for rec in recs:
            if rec.id not in self._current:
                self._current[rec.id] = rec
                out.append(RecommendationEvent(status="created", recommendation=rec, at=now))
        return out

    def observe(self, version: str) -> list[RecommendationEvent]:
        """The inventory is now at ``version``: everything computed on another is ``superseded``."""
        now = self.clock.now()
        stale = [r for r in self._current.values() if r.inventory_version != version]
        for r in stale:
            del self._current[r.id]
        return [RecommendationEvent(status="superseded", recommendation=r, at=now, superseded_by=version)
                for r in stale]

    def dismiss(self, policy: str) -> list[RecommendationEvent]:
        """The fleet is balanced again: what ``policy`` recommended is ``dismissed``. Others
        (a host's plane, a fault) are not the balancer's to withdraw."""
        now = self.clock.now()
        out = [RecommendationEvent(status="dismissed", recommendation=r, at=now)
               for r in self.current() if r.reason.policy == policy]
        for e in out:
            del self._current[e.recommendation.id]
        return out

    def apply(self, rec_id: str, version: str) -> tuple[Recommendation, RecommendationEvent]:
        """Take ``rec_id`` to run it, if it was computed on the inventory as it is (``version``).

        A stale one is refused and left for :meth:`observe`, whose events say it is superseded.
        """
        rec = self._current.get(rec_id)
        if rec is None:
            raise RecommendationError(f"no current recommendation {rec_id!r} (unknown, applied or superseded)")
        if rec.inventory_version != version:
            raise RecommendationError(
                f"recommendation {rec_id!r} is superseded: computed on inventory "
                f"{rec.inventory_version}, which is now {version}")
        del self._current[rec_id]
        return rec, RecommendationEvent(status="applied", recommendation=rec, at=self.clock.now())
