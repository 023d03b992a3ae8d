"""The coordinator's autonomic management: the balancer loop over the hosts' telemetry, and
what policies and faults ask for (docs/balancing.md)."""

from .service import AutonomicOptions, AutonomicService

__all__ = ["AutonomicOptions", "AutonomicService"]
