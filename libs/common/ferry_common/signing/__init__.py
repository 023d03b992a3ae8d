"""Ed25519 message signatures with staleness, replay and permission checks.

Every message a service sends carries three headers:

``x-ferry-sender``
    the sender's identity (``coordinator``, ``host/host-a/sensor``, ``client/ops-alice``);
``x-ferry-key-id``
    the first 16 hex digits of sha256 over the signing key's raw public bytes;
``x-ferry-signature``
    base64 Ed25519 signature over :func:`canonical_bytes`.

The signature binds the sender, key id, routing key, type, message id, correlation id,
reply-to, timestamp and sha256 of the body. No other header is signed: ``traceparent``
and ``tracestate`` are rewritten by tracing middleware, and the bus and broker add their
own (``x-delivery-count``, dead-letter reasons). Handlers must therefore never base a
decision on an unsigned header.

:meth:`Ed25519Authenticator.verify` is synchronous and costs one Ed25519 verification
plus a hash of the body (tens of microseconds); everything else is dictionary lookups.

Key material lives in a directory (a Kubernetes Secret mount works as is), see
:func:`load_keyring`; :func:`authenticator_from_env` builds the authenticator for a
service from ``FERRY_AUTH``, ``FERRY_KEYS_DIR`` and ``FERRY_IDENTITY``.

One module per concept: :mod:`.permissions` (identities, who may send what),
:mod:`.canonical` (what a signature covers), :mod:`.authenticator`, :mod:`.keys` (key
files and directories), :mod:`.env` (from the environment), :mod:`.cli` (the key CLI).
"""

from __future__ import annotations

from ..errors import Replayed, Unauthenticated
from .authenticator import Ed25519Authenticator
from .canonical import (
    KEY_ID_HEADER,
    SENDER_HEADER,
    SIGNATURE_DOMAIN,
    SIGNATURE_HEADER,
    canonical_bytes,
)
from .cli import main
from .env import auth_factory_from_env, authenticator_from_env
from .keys import (
    PERMISSIONS_FILE,
    TRUST_FILES,
    Keyring,
    PublicKeys,
    generate_keypair,
    init_keydir,
    key_id,
    load_keyring,
    load_private_key,
    load_public_key,
)
from .permissions import (
    DEFAULT_PERMISSIONS,
    DEFAULT_ROUTE_TYPES,
    Permissions,
    valid_identity,
)

__all__ = [
    "DEFAULT_PERMISSIONS",
    "DEFAULT_ROUTE_TYPES",
    "KEY_ID_HEADER",
    "PERMISSIONS_FILE",
    "SENDER_HEADER",
    "SIGNATURE_DOMAIN",
    "SIGNATURE_HEADER",
    "TRUST_FILES",
    "Ed25519Authenticator",
    "Keyring",
    "Permissions",
    "PublicKeys",
    "Replayed",
    "Unauthenticated",
    "auth_factory_from_env",
    "authenticator_from_env",
    "canonical_bytes",
    "generate_keypair",
    "init_keydir",
    "key_id",
    "load_keyring",
    "load_private_key",
    "load_public_key",
    "main",
    "valid_identity",
]
