"""Policy actions that ask the coordinator's balancer for something, as typed messages.

They are ``migrate`` actions whose ``key`` names what is asked (a ``migrate`` with a
``target_host`` and no such key moves the VM there at once, as it always did):
``request_migration`` and ``recommend_migration`` (of the plane's VM, or of the VM the value's
``vm_id`` names) become a ``MigrationWanted``; ``evacuate_host`` (this host) an
``EvacuationWanted``. The ``value`` (CEL) says why: a string, or a map whose ``reason`` is the
reason kind (``fault`` by default, ``maintenance`` or ``load``), whose ``detail`` is the text
and whose numbers are the figures. They go out through the plane's durable outbox like every
other effect: made once (a resend carries the same id), sent in order, after the policies'
state that fired them is stored.
"""

from __future__ import annotations

import logging
from typing import Any

from ferry_common.bus.topology import AUTONOMIC_WANTED
from ferry_common.ids import new_id
from ferry_common.messages.base import Wire
from ferry_common.messages.recommendations import EvacuationWanted, MigrationWanted

from .policy import Effect

log = logging.getLogger(__name__)
ASKS = ("request_migration", "recommend_migration", "evacuate_host")
REASONS = ("fault", "maintenance", "load")


def _detail(value: Any) -> tuple[str, dict[str, float], str]:
    if isinstance(value, dict):
        figures = {str(k)[:64]: float(v) for k, v in value.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        reason = str(value.get("reason", "fault"))
        detail = str(value.get("detail", ""))[:1000]
        if reason not in REASONS:
            log.warning("policy asked to move for %r: taken as a fault (one of %s)", reason, ", ".join(REASONS))
            detail, reason = f"(reason {reason[:64]!r} taken as fault) {detail}"[:1000], "fault"
        return reason, dict(list(figures.items())[:32]), detail
    return "fault", {}, "" if value is None else str(value)[:1000]


def wanted(effect: Effect, *, vm_id: str, host: str, policy: str, embot_id: str) -> tuple[str, Wire] | None:
    """The message ``effect`` asks for, with its routing key; None if it is not one of these."""
    if effect.kind != "migrate" or effect.key not in ASKS:
        return None
    kind, figures, detail = _detail(effect.value)
    if effect.key == "evacuate_host":
        return AUTONOMIC_WANTED, EvacuationWanted(id=new_id(), host=host, kind=kind, policy=policy,  # type: ignore[arg-type]
                                                  detail=detail)
    named = effect.value.get("vm_id") if isinstance(effect.value, dict) else None
    return AUTONOMIC_WANTED, MigrationWanted(
        id=new_id(), vm_id=str(named or vm_id), kind=kind, act=effect.key == "request_migration",  # type: ignore[arg-type]
        target_host=effect.target_host, policy=policy, embot_id=embot_id, host=host,
        own=named is None or named == vm_id, figures=figures, detail=detail)
