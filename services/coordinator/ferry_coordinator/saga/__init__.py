"""One migration, run as a saga: the plan (``plan``), the driver that walks it (``driver``),
and the step bodies by what they do."""

from .driver import MigrationSaga
from .interfaces import CommandPort, SagaContext
from .plan import STEPS, Plan, StepSpec, build_plan
from .port import BusPort
from .run import LostLease

__all__ = ["STEPS", "BusPort", "CommandPort", "LostLease", "MigrationSaga", "Plan", "SagaContext", "StepSpec", "build_plan"]
