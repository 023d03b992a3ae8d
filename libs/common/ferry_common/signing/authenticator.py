"""The Ed25519 authenticator: signs what a service sends, checks what it receives."""

from __future__ import annotations

import base64
import binascii
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import replace

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from ..bus.interfaces import Message
from ..clock import Clock, SystemClock
from ..errors import Replayed, Unauthenticated
from .canonical import KEY_ID_HEADER, SENDER_HEADER, SIGNATURE_HEADER, canonical_bytes
from .keys import PublicKeys, key_id, trust_table
from .permissions import Patterns, Permissions, valid_identity


class Ed25519Authenticator:
    """Signs outgoing messages and checks incoming ones (see the module docstring).

    ``trusted`` maps identity patterns to the public keys allowed to sign for them, for
    example ``{"coordinator": k_coord, "host/host-a/*": k_a, "client/ops-alice": k_alice}``;
    a value may be a list of keys during a rotation. A key only signs for the patterns it
    is listed under, so host-a's key cannot sign as ``host/host-b/...``. The service's own
    public key is trusted for its own identity.

    ``permissions=None`` checks authenticity only: any trusted sender may send any type.

    Replay protection is per process and only covers ids passed to :meth:`accepted`: a
    broker redelivery of a message that was never handled carries the same id and passes.
    Size ``replay_window`` above peak accepted messages per ``max_age_s + max_skew_s``;
    beyond that the oldest ids are forgotten while still fresh.
    """

    def __init__(
        self,
        identity: str,
        private_key: Ed25519PrivateKey,
        trusted: Mapping[str, PublicKeys],
        *,
        clock: Clock | None = None,
        max_age_s: float = 300.0,
        max_skew_s: float = 30.0,
        replay_window: int = 100_000,
        permissions: Permissions | None = None,
    ) -> None:
        if not valid_identity(identity):
            raise ValueError(f"malformed identity {identity!r}")
        if max_age_s <= 0 or max_skew_s < 0 or replay_window <= 0:
            raise ValueError(
                "max_age_s and replay_window must be positive, max_skew_s not negative"
            )
        self.identity = identity
        self._private = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id(self.public_key)
        self.clock: Clock = clock or SystemClock()
        self.max_age_s = float(max_age_s)
        self.max_skew_s = float(max_skew_s)
        self.replay_window = replay_window
        self.permissions = permissions
        # our own key always signs for our own identity: we hold it, and services talk to themselves
        self._trusted = trust_table(_merge(trusted, {identity: self.public_key}))
        self._known_senders = Patterns(
            p for t in self._trusted.values() for p in t.patterns.patterns
        )
        # (sender, message id) -> message timestamp, oldest acceptance first
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()

    # -- sending --
    def sign(self, message: Message) -> Message:
        """Return ``message`` signed as this service (a zero timestamp is set to now)."""
        if message.timestamp == 0.0:
            message = replace(message, timestamp=self.clock.now())
        if not math.isfinite(message.timestamp):
            raise ValueError("cannot sign a message with a non-finite timestamp")
        signature = self._private.sign(canonical_bytes(message, self.identity, self.key_id))
        headers = dict(message.headers)
        headers[SENDER_HEADER] = self.identity
        headers[KEY_ID_HEADER] = self.key_id
        headers[SIGNATURE_HEADER] = base64.b64encode(signature).decode("ascii")
        return replace(message, headers=headers)

    # -- receiving --
    def verify(self, message: Message) -> str:
        """Return the sender identity, or raise :class:`Unauthenticated` saying why not.

        Cheap checks come first so that junk costs no signature verification; the replay
        and permission checks come after the signature so that their reasons are only
        ever given about authentic messages.
        """
        headers = message.headers
        encoded = headers.get(SIGNATURE_HEADER)
        if not encoded:
            raise Unauthenticated(f"missing signature ({SIGNATURE_HEADER})")
        sender = headers.get(SENDER_HEADER)
        if not sender:
            raise Unauthenticated(f"missing sender ({SENDER_HEADER})")
        if not valid_identity(sender):
            raise Unauthenticated(f"malformed sender {sender[:80]!r}")
        kid = headers.get(KEY_ID_HEADER)
        if not kid:
            raise Unauthenticated(f"missing key id ({KEY_ID_HEADER}) from {sender}")
        trusted = self._trusted.get(kid)
        if trusted is None:
            if not self._known_senders.match(sender):
                raise Unauthenticated(f"unknown sender {sender}")
            raise Unauthenticated(f"unknown key {kid[:32]!r} for sender {sender}")
        if not trusted.patterns.match(sender):
            raise Unauthenticated(
                f"key {kid} may sign only as {', '.join(trusted.patterns.patterns)}, not as {sender}"
            )
        if not message.message_id:
            raise Unauthenticated(f"message from {sender} has no message id")
        self._check_fresh(message.timestamp, sender)
        signature = _decode_signature(encoded)
        if signature is None:
            raise Unauthenticated(f"malformed signature from {sender}")
        try:
            trusted.key.verify(signature, canonical_bytes(message, sender, kid))
        except InvalidSignature:
            raise Unauthenticated(f"bad signature from {sender} (key {kid})") from None
        if (sender, message.message_id) in self._seen:
            raise Replayed(f"replayed message id {message.message_id} from {sender}")
        if self.permissions is not None:
            type_name = self.permissions.effective_type(message)
            if not self.permissions.allows(sender, type_name):
                what = type_name or f"untyped message on {message.routing_key!r}"
                raise Unauthenticated(f"{sender} is not permitted to send {what}")
        return sender

    def _check_fresh(self, timestamp: float, sender: str) -> None:
        if not math.isfinite(timestamp):
            raise Unauthenticated(f"message from {sender} has no valid timestamp")
        age = self.clock.now() - timestamp
        if age > self.max_age_s:
            raise Unauthenticated(
                f"stale message from {sender}: {age:.1f}s old, limit {self.max_age_s:g}s"
            )
        if -age > self.max_skew_s:
            raise Unauthenticated(
                f"message from {sender} is {-age:.1f}s in the future, allowed skew {self.max_skew_s:g}s"
            )

    def accepted(self, message: Message) -> None:
        """Remember a handled message's id so that a replay of it is refused."""
        sender = message.headers.get(SENDER_HEADER)
        if not sender or not message.message_id:
            return
        key = (sender, message.message_id)
        if key in self._seen:
            return
        self._seen[key] = message.timestamp
        # ids whose timestamp is past max_age are refused as stale anyway: forget them first
        horizon = self.clock.now() - self.max_age_s
        seen = self._seen
        while seen:
            oldest = next(iter(seen.values()))
            if oldest >= horizon:
                break
            seen.popitem(last=False)
        while len(seen) > self.replay_window:
            seen.popitem(last=False)

    @property
    def remembered(self) -> int:
        """How many accepted ids the replay window holds."""
        return len(self._seen)


def _merge(
    trusted: Mapping[str, PublicKeys], extra: Mapping[str, PublicKeys]
) -> dict[str, list[Ed25519PublicKey]]:
    merged: dict[str, list[Ed25519PublicKey]] = {}
    for source in (trusted, extra):
        for pattern, keys in source.items():
            merged.setdefault(pattern, []).extend(
                [keys] if isinstance(keys, Ed25519PublicKey) else keys
            )
    return merged


def _decode_signature(encoded: str) -> bytes | None:
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return None
    # refuse non-canonical encodings (stray low bits before the padding): one signature, one header
    if len(raw) != 64 or base64.b64encode(raw).decode("ascii") != encoded:
        return None
    return raw


