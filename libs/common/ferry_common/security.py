"""Message authentication hooks.

The :class:`Authenticator` signs what a service sends and checks what it receives.
:class:`NoAuth` is the default for the demo and unit tests; :mod:`.signing`
provides Ed25519 signatures with replay and staleness checks.
"""

from __future__ import annotations

from typing import Protocol

from .bus.interfaces import Message


def host_identity(host: str, service: str) -> str:
    """The identity a host service sends as (and is authenticated as), e.g. ``host/host-a/sensor``."""
    return f"host/{host}/{service}"


class Authenticator(Protocol):
    def sign(self, message: Message) -> Message:
        """Return ``message`` with whatever headers prove who sent it."""

    def verify(self, message: Message) -> str | None:
        """Raise :class:`~ferry_common.errors.Unauthenticated` unless the message is good.

        Returns the authenticated sender identity, if there is one.
        """

    def accepted(self, message: Message) -> None:
        """Called once the message was handled, to remember its id against replays."""


class NoAuth:
    """Accepts everything; identities are whatever the sender header claims."""

    def sign(self, message: Message) -> Message:
        return message

    def verify(self, message: Message) -> str | None:
        return message.headers.get("x-ferry-sender")

    def accepted(self, message: Message) -> None:
        return None
