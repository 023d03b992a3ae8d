"""The error taxonomy.

Every error says whether retrying can help. The bus maps that straight onto
acknowledgement: a retryable error is nacked and redelivered (up to the queue's
delivery limit), a non-retryable one is dead-lettered with its reason and the
sender is told. Tenacity predicates use :func:`is_retryable`.
"""

from __future__ import annotations


class FerryError(Exception):
    """Base of every error Ferry raises on purpose."""

    code: str = "error"
    retryable: bool = False

    def __init__(self, reason: str, *, code: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if code is not None:
            self.code = code


class InvalidMessage(FerryError):
    """The message cannot be decoded or fails validation; never retried."""

    code = "invalid_message"


class Unauthenticated(FerryError):
    """Missing or wrong signature, replayed id, stale timestamp, or a sender not allowed."""

    code = "unauthenticated"


class Replayed(Unauthenticated):
    """A message id that was already accepted arrived again.

    Its ``code`` is still ``unauthenticated``; the subclass lets the consumer runtime tell
    a duplicate of a message it already handled (for example a redelivery after a lost
    ack) from a forgery, and settle it quietly.
    """


class UnknownMessageType(InvalidMessage):
    code = "unknown_type"


class Unroutable(FerryError):
    """The broker returned a mandatory message: no queue is bound for its routing key."""

    code = "unroutable"


class Transient(FerryError):
    """A passing fault (connection lost, broker busy); retrying is expected to help."""

    code = "transient"
    retryable = True


class StepError(FerryError):
    """Why a saga step failed. The saga decides from the type (reject, roll back, retry,
    go forward); ``code`` is the public code the record and the status events carry."""


class Rejected(StepError):
    """Refused before anything was done: the migration ends rejected, nothing to undo."""

    code = "rejected"


class Denied(Rejected):
    """The target's admission policy said no (its code: ``wrong_host``, ``source_not_allowed``,
    ``insufficient_resources``)."""

    code = "denied"


class Cancelled(StepError):
    """An operator cancelled, or the hypervisor reported the migration cancelled."""

    code = "cancelled"


class TimedOut(StepError):
    """No answer in time (the request, or the reply, may have been lost): asking again helps."""

    code = "timeout"
    retryable = True


StepTimeout = TimedOut  # the name the endpoint has always raised


class Unreachable(StepError):
    """No queue takes the host service's commands: it is not connected."""

    code = "unreachable"


class SendFailed(StepError):
    """The request did not get out (connection lost): it never reached a queue, so it is sent
    again; unlike a timeout, nothing waits in a durable queue."""

    code = "transient"
    retryable = True


class FailedOnHost(StepError):
    """The host service answered with a failure (an error reply, or a step's failure answer)."""

    code = "failed_on_host"

    def __init__(self, reason: str, *, code: str | None = None, retryable: bool = False) -> None:
        super().__init__(reason, code=code)
        self.retryable = retryable


class ProtocolError(StepError):
    """An answer the command does not accept, or a message that could not be built or sent."""

    code = "protocol_error"


class RemoteError(FerryError):
    """The service that handled a request answered with an error."""

    def __init__(self, reason: str, *, code: str, retryable: bool = False) -> None:
        super().__init__(reason, code=code)
        self.retryable = retryable


class Conflict(FerryError):
    """The request contradicts the current state (for example a fenced owner)."""

    code = "conflict"


def is_retryable(exc: BaseException) -> bool:
    """Tenacity predicate: retry only what says it may help."""
    return isinstance(exc, FerryError) and exc.retryable
