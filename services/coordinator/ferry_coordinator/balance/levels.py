"""Automation levels: per cluster, overridable per VM, and the act-or-recommend decision.

``manual``: every move is only a recommendation. ``partial``: moves for a fault or for
maintenance are acted on, load moves are only recommended (DRS's "partially automated" keeps
initial placement automatic; Ferry's keeps the moves that protect a VM). ``full``: all acted on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

from ferry_common.messages.recommendations import AutomationLevel, ReasonKind

Decision = Literal["act", "recommend"]
LEVELS: tuple[AutomationLevel, ...] = get_args(AutomationLevel)
KINDS: tuple[ReasonKind, ...] = get_args(ReasonKind)


def decide(level: AutomationLevel, kind: ReasonKind) -> Decision:
    """Whether a move for ``kind`` is started at ``level`` or only recommended."""
    if level not in LEVELS:
        raise ValueError(f"unknown automation level {level!r}; one of {', '.join(LEVELS)}")
    if kind not in KINDS:
        raise ValueError(f"unknown reason kind {kind!r}; one of {', '.join(KINDS)}")
    if level == "full":
        return "act"
    if level == "partial" and kind in ("fault", "maintenance"):
        return "act"
    return "recommend"


@dataclass(frozen=True)
class AutomationPolicy:
    """The cluster's level and the VMs that override it."""

    cluster: AutomationLevel = "manual"  # nothing moves by itself until an operator says so
    per_vm: Mapping[str, AutomationLevel] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for where, level in [("cluster", self.cluster), *self.per_vm.items()]:
            if level not in LEVELS:
                raise ValueError(f"automation level of {where}: {level!r} is not one of {', '.join(LEVELS)}")

    def level_for(self, vm_id: str) -> AutomationLevel:
        return self.per_vm.get(vm_id, self.cluster)

    def decide(self, vm_id: str, kind: ReasonKind) -> Decision:
        return decide(self.level_for(vm_id), kind)
