"""The command port over the bus: routing keys from the commands' declarations, replies
checked against them, and the endpoint's failures as typed step errors."""

from __future__ import annotations

from typing import TypeVar

from ferry_common.bus.topology import HostService, host_command
from ferry_common.endpoint import Endpoint
from ferry_common.errors import (
    FailedOnHost,
    FerryError,
    ProtocolError,
    RemoteError,
    SendFailed,
    TimedOut,
    Unreachable,
    Unroutable,
)
from ferry_common.messages.base import Wire
from ferry_common.messages.commands import Command

W = TypeVar("W", bound=Wire)


def service_of(command: Command, service: HostService | None) -> HostService:
    """The host service ``command`` goes to: its only one, or ``service`` among its own."""
    declared = type(command).services
    if service is None and len(declared) == 1:
        return declared[0]
    if service is not None and service in declared:
        return service
    raise ProtocolError(f"{type(command).__name__} goes to one of {declared}, not {service!r}")


def check_reply(command: Command, answer: Wire, who: str) -> Wire:
    if not isinstance(answer, type(command).replies):
        raise ProtocolError(f"{who}: {type(answer).__name__} does not answer {type(command).__name__}")
    return answer


def expect(answer: Wire, model: type[W]) -> W:
    """``answer`` as ``model``; any other accepted answer is a protocol error here."""
    if not isinstance(answer, model):
        raise ProtocolError(f"expected {model.__name__}, got {type(answer).__name__}")
    return answer


class BusPort:
    """A :class:`~.interfaces.CommandPort` on an :class:`Endpoint` (request and reply)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    async def call(self, host: str, command: Command, *, timeout_s: float,
                   service: HostService | None = None, answered_by: str = "") -> Wire:
        svc = service_of(command, service)
        who = f"{svc} on {host}" + (f" (answered by {answered_by})" if answered_by else "")
        try:
            answer = await self.endpoint.request(host_command(host, svc), command, timeout=timeout_s)
        except TimedOut as exc:
            raise TimedOut(f"{who}: {exc.reason}") from None
        except Unroutable:
            raise Unreachable(f"{who} is not connected") from None
        except RemoteError as exc:
            raise FailedOnHost(f"{who}: {exc.reason}", code=exc.code, retryable=exc.retryable) from None
        except FerryError as exc:  # raised here, before or after the bus (connection lost, signing)
            raise (SendFailed if exc.retryable else ProtocolError)(exc.reason, code=exc.code) from None
        return check_reply(command, answer, who)

