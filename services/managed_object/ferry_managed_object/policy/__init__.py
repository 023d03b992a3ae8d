"""Policies are data: CEL conditions and actions evaluated by cel-python, never ``eval``.

One module per concept: :mod:`.engine` (compile once, evaluate, apply actions),
:mod:`.fastpath` (the native evaluator of the common expressions), :mod:`.cost` (the static
bound on an evaluation's cost), :mod:`.state` (an embot's state kept within the wire's
limits), :mod:`.errors`.
"""

from __future__ import annotations

from .cost import MAX_COST, cost
from .engine import Effect, PolicyEngine, check_cel, to_python
from .errors import PolicyError
from .fastpath import FALLBACK, Native, native
from .state import MAX_STATE_NODES, _state_problem

__all__ = [
    "FALLBACK",
    "MAX_COST",
    "MAX_STATE_NODES",
    "Effect",
    "Native",
    "PolicyEngine",
    "PolicyError",
    "_state_problem",
    "check_cel",
    "cost",
    "native",
    "to_python",
]
