"""Policy actions that ask the coordinator's balancer for something, as typed messages.

``request_migration`` and ``recommend_migration`` (of the plane's VM, or of the VM a host
policy names in its value's ``vm_id``) become a ``MigrationWanted``; ``evacuate_host`` (this
host) an ``EvacuationWanted``. The action's ``key`` is the reason kind (``fault`` by default,
``maintenance`` or ``load``); its ``value`` (CEL) gives the detail: a string, or a map whose
numbers are the figures and whose ``detail`` is the text. They go out through the plane's
durable outbox like every other effect: made once (a resend carries the same id), sent in
order, after the policies' state that fired them is stored.
"""

from __future__ import annotations

from typing import Any

from ferry_common.bus.topology import AUTONOMIC_WANTED
from ferry_common.ids import new_id
from ferry_common.messages.base import Wire
from ferry_common.messages.recommendations import EvacuationWanted, MigrationWanted

from .policy import Effect

KINDS = ("request_migration", "recommend_migration", "evacuate_host")


def _detail(value: Any) -> tuple[dict[str, float], str]:
    if isinstance(value, dict):
        figures = {str(k)[:64]: float(v) for k, v in value.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        return dict(list(figures.items())[:32]), str(value.get("detail", ""))[:1000]
    return {}, "" if value is None else str(value)[:1000]


def wanted(effect: Effect, *, vm_id: str, host: str, policy: str, embot_id: str) -> tuple[str, Wire] | None:
    """The message ``effect`` asks for, with its routing key; None if it is not one of these."""
    if effect.kind not in KINDS:
        return None
    kind = effect.key or "fault"
    figures, detail = _detail(effect.value)
    if effect.kind == "evacuate_host":
        return AUTONOMIC_WANTED, EvacuationWanted(id=new_id(), host=host, kind=kind, policy=policy,  # type: ignore[arg-type]
                                                  detail=detail)
    named = effect.value.get("vm_id") if isinstance(effect.value, dict) else None
    return AUTONOMIC_WANTED, MigrationWanted(
        id=new_id(), vm_id=str(named or vm_id), kind=kind, act=effect.kind == "request_migration",  # type: ignore[arg-type]
        target_host=effect.target_host, policy=policy, embot_id=embot_id, host=host,
        own=named is None or named == vm_id, figures=figures, detail=detail)
