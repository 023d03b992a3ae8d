"""The policy engine's error."""

from __future__ import annotations


class PolicyError(Exception):
    """A policy that does not compile, or an expression that fails on this input."""

