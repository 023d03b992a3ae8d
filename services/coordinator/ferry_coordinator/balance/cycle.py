"""One balancing round, end to end: evaluate, decide act or recommend, keep the book.

This is what the coordinator's active replica calls every ``rules.interval_s`` and on events
(a new inventory or load sample, a fault): :meth:`BalanceCycle.run` returns the moves to start
now (at the lowest priority, each with the reason to record on its migration and trace) and
the ``recommendation.*`` events to publish.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ferry_common.messages.recommendations import MoveReason, RecommendationEvent

from .balancer import LOAD_POLICY, Balancer, Evaluation, Proposal, WorkInFlight
from .levels import AutomationPolicy
from .model import Fleet
from .recommendations import RecommendationBook, recommendation


@dataclass(frozen=True)
class Action:
    """A move to start now, and why (recorded on the migration and its trace)."""

    proposal: Proposal
    reason: MoveReason


@dataclass(frozen=True)
class RoundResult:
    evaluation: Evaluation
    actions: tuple[Action, ...]
    events: tuple[RecommendationEvent, ...]


class BalanceCycle:
    def __init__(self, balancer: Balancer, policy: AutomationPolicy, book: RecommendationBook) -> None:
        self.balancer = balancer
        self.policy = policy
        self.book = book

    def run(self, fleet: Fleet, work: WorkInFlight | None = None) -> RoundResult:
        """Evaluate the fleet's load balance; the actions' cooldowns start now."""
        ev = self.balancer.evaluate(fleet, work)
        events = self.book.observe(ev.version)
        if ev.idle == "balanced":
            events += self.book.dismiss(LOAD_POLICY)
        actions, more = self.triage(ev.proposals, ev.version)
        return RoundResult(ev, actions, tuple(events + more))

    def triage(self, proposals: Iterable[Proposal], version: str) -> tuple[tuple[Action, ...], list[RecommendationEvent]]:
        """Split moves (load ones from the balancer, or fault and maintenance ones from an
        evacuation) into those started now and those only recommended, by each VM's level."""
        actions: list[Action] = []
        recs = []
        now = self.balancer.clock.now()
        for p in proposals:
            level = self.policy.level_for(p.move.vm_id)
            if self.policy.decide(p.move.vm_id, p.kind) == "act":
                reason = MoveReason(kind=p.kind, policy=p.policy, level=level, figures=p.figures())
                actions.append(Action(p, reason))
                self.balancer.started(p.move.vm_id)
            else:
                recs.append(recommendation(p, level, version, now))
        return tuple(actions), self.book.offer(recs)
