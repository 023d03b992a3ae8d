"""Autonomic moves: why a VM should move, and the recommendations a balancer publishes.

A recommendation is published on ``recommendation.<status>`` as a ``RecommendationEvent``
(``created`` when first computed, ``superseded`` when the inventory it was computed on has
changed, ``applied`` once an operator ran it, ``dismissed`` when the imbalance went away).
``ApplyRecommendation`` asks the coordinator to run one (``ferry recommendations apply ID``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from .base import Wire
from .limits import Name, Text

#: Why a VM moves: the three reasons of the seed.
ReasonKind = Literal["load", "fault", "maintenance"]
#: How much the balancer may do by itself (per cluster, overridable per VM):
#: ``manual`` only recommends, ``partial`` acts on faults and maintenance, ``full`` acts on all.
AutomationLevel = Literal["manual", "partial", "full"]
RecommendationStatus = Literal["created", "superseded", "applied", "dismissed"]
#: A hash of the inventory (hosts, capacities, where each VM runs) a move was computed on.
InventoryVersion = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16,64}$")]
Figure = Annotated[float, Field(ge=-1e12, le=1e12)]


class MoveReason(Wire):
    """Why a move was proposed: the policy, the figures it saw, the automation level it ran at."""

    kind: ReasonKind
    policy: Name
    level: AutomationLevel
    figures: dict[Name, Figure] = Field(default_factory=dict, max_length=32)
    detail: Text = ""


class Recommendation(Wire):
    """One proposed move, computed on the inventory ``inventory_version``."""

    id: Name
    vm_id: Name
    source_host: Name
    target_host: Name
    reason: MoveReason
    inventory_version: InventoryVersion
    created_at: float = Field(default=0.0, ge=0)


class RecommendationEvent(Wire):
    """A recommendation's change of status, on ``recommendation.<status>``."""

    status: RecommendationStatus
    recommendation: Recommendation
    at: float = Field(default=0.0, ge=0)
    #: for ``superseded``: the inventory version that made it stale
    superseded_by: InventoryVersion | None = None


class ApplyRecommendation(Wire):
    """Run a recommendation (refused if it is unknown or superseded)."""

    recommendation_id: Name
    requested_by: Name | None = None
