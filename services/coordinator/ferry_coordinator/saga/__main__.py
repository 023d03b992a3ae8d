"""``python -m ferry_coordinator.saga``: print the saga's plan with the default timeouts."""

from ..timeouts import SagaTimeouts
from .plan import build_plan, describe

print(describe(build_plan(SagaTimeouts())))
