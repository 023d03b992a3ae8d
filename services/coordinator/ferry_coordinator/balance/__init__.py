"""Autonomic load balancing: the fleet model, the imbalance metric, the balancer and its rules
against storms, automation levels, and recommendations. Pure: no bus, no store; the
coordinator feeds it snapshots and carries out what it returns (:class:`BalanceCycle`)."""

from .balancer import Balancer, BalancerState, Evaluation, Proposal, WorkInFlight
from .cycle import Action, BalanceCycle, RoundResult
from .levels import AutomationPolicy, decide
from .metric import host_utilisation, imbalance
from .model import Fleet, FleetError, HostLoad, Move, VmLoad, inventory_version
from .placement import CapacityPlacement, Placement
from .recommendations import RecommendationBook, RecommendationError
from .rules import BalanceRules

__all__ = [
    "Action", "AutomationPolicy", "BalanceCycle", "BalanceRules", "Balancer", "BalancerState",
    "CapacityPlacement", "Evaluation", "Fleet", "FleetError", "HostLoad", "Move", "Placement",
    "Proposal", "RecommendationBook", "RecommendationError", "RoundResult", "VmLoad", "WorkInFlight",
    "decide", "host_utilisation", "imbalance", "inventory_version",
]
