"""What a saga needs from the world around it, in one place: the command port it sends
through and the coordinator's context."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from ferry_common.bus.topology import HostService
from ferry_common.clock import Clock
from ferry_common.messages.base import Wire
from ferry_common.messages.commands import Command, VmMigrationFinished
from ferry_common.messages.public import MigrationStatusEvent

from ..store import SagaRecord, SagaStore
from ..timeouts import SagaTimeouts


class CommandPort(Protocol):
    """Sends a command to a host service and returns its answer, one of the command's
    declared replies; every failure is a typed :class:`~ferry_common.errors.StepError`."""

    async def call(self, host: str, command: Command, *, timeout_s: float,
                   service: HostService | None = None, answered_by: str = "") -> Wire:
        """``service``: which one, for a command several services take; ``answered_by``
        names the service that answers a command forwarded to it (for the reasons given)."""


@dataclass
class SagaContext:
    """What a saga needs from the coordinator that runs it."""

    port: CommandPort
    clock: Clock
    identity: str  # the coordinator's, on the saga's spans
    publish: Callable[[MigrationStatusEvent], Awaitable[None]]  # a status event, best effort
    store: SagaStore
    timeouts: SagaTimeouts
    owner: str
    notify_key: str
    wait_notification: Callable[[str, float], Awaitable[VmMigrationFinished | None]]
    cancel_reason: Callable[[str], str | None]  # set when an operator cancelled (this replica)
    on_finished: Callable[[SagaRecord], Awaitable[None]]
    on_owner: Callable[[str, str, int], None]
    # returns once the host is marked not ready (its heartbeats stopped): a step racing it
    # fails over at once instead of waiting out its timeouts. None: no liveness (unit tests)
    host_down: Callable[[str], Awaitable[None]] | None = None
