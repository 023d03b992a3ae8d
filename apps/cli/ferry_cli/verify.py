"""Moved to :mod:`ferry_testing.verify`; this name re-exports it for older imports."""

from ferry_testing.verify import Inspections, inspect_all, problems, replay, state_problems

__all__ = ["Inspections", "inspect_all", "problems", "replay", "state_problems"]
