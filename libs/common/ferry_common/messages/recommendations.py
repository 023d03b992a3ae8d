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


class MigrationWanted(Wire):
    """A policy (a VM's embot, or a host's) wants ``vm_id`` moved: ``act`` asks for it to be
    started (``request_migration``), otherwise it is only recommended
    (``recommend_migration``). The coordinator's autonomic module queues it or records a
    recommendation, by the VM's automation level for ``kind``. ``id`` is fixed when the policy
    fires: resending it changes nothing."""

    id: Name
    vm_id: Name
    kind: ReasonKind = "fault"
    act: bool = True
    target_host: Name | None = None  # None: placement picks
    policy: Name
    embot_id: Name | None = None
    host: Name | None = None  # where the policy ran
    #: a VM's own embot asking for its VM: an operator-level request (the VM's owner asked),
    #: not automatic balancing
    own: bool = False
    figures: dict[Name, Figure] = Field(default_factory=dict, max_length=32)
    detail: Text = ""


class EvacuationWanted(Wire):
    """A policy or a fault wants every VM off ``host`` (``evacuate_host``), for ``kind``
    (fault or maintenance). Acted on or recommended by each VM's automation level."""

    id: Name
    host: Name
    kind: ReasonKind = "fault"
    policy: Name
    severity: Name | None = None
    detail: Text = ""


class ListRecommendations(Wire):
    """Ask for the current recommendations and the automation level (``ferry recommendations``)."""


class RecommendationList(Wire):
    recommendations: list[Recommendation] = Field(default_factory=list, max_length=10_000)
    level: AutomationLevel = "manual"
    leader: Name | None = None
    imbalance: float | None = None


class SetAutomationLevel(Wire):
    """Change the cluster's automation level at run time (kept in the saga store)."""

    level: AutomationLevel
    requested_by: Name | None = None
