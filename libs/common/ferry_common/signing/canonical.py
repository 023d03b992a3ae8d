"""The canonical form a message signature covers, and the headers that carry it."""

from __future__ import annotations

import hashlib
import struct

from ..bus.interfaces import Message

SENDER_HEADER = "x-ferry-sender"
KEY_ID_HEADER = "x-ferry-key-id"
SIGNATURE_HEADER = "x-ferry-signature"

#: Bumped whenever :func:`canonical_bytes` changes, so old and new signatures never collide.
SIGNATURE_DOMAIN = b"ferry-message-signature-v1\x00"


_LEN = struct.Struct(">I")
_ABSENT = b"\xff\xff\xff\xff"  # no string is 4 GiB long, so None never equals any string


def _field(value: str | None) -> bytes:
    if value is None:
        return _ABSENT
    # surrogatepass: never raise on odd input, and stay injective
    raw = value.encode("utf-8", "surrogatepass")
    return _LEN.pack(len(raw)) + raw


def canonical_bytes(message: Message, sender: str, kid: str) -> bytes:
    """The byte string a signature covers.

    Length-prefixed fields in a fixed order, so no two different messages share an
    encoding (``None`` differs from ``""``; no field can bleed into the next). The
    timestamp is ``repr`` of the float, which the AMQP bus carries exactly.
    """
    return b"".join(
        (
            SIGNATURE_DOMAIN,
            _field(sender),
            _field(kid),
            _field(message.routing_key),
            _field(message.type),
            _field(message.message_id),
            _field(message.correlation_id),
            _field(message.reply_to),
            _field(repr(float(message.timestamp))),
            hashlib.sha256(message.body).digest(),
        )
    )

