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
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import os
import re
import stat
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from fnmatch import translate
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .bus.interfaces import Message
from .bus.topology import MIGRATION_CANCEL, MIGRATION_REQUESTED
from .clock import Clock, SystemClock
from .errors import Replayed, Unauthenticated
from .security import Authenticator, NoAuth

log = logging.getLogger(__name__)

SENDER_HEADER = "x-ferry-sender"
KEY_ID_HEADER = "x-ferry-key-id"
SIGNATURE_HEADER = "x-ferry-signature"

#: Bumped whenever :func:`canonical_bytes` changes, so old and new signatures never collide.
SIGNATURE_DOMAIN = b"ferry-message-signature-v1\x00"

#: Files in a key directory.
TRUST_FILES = ("trust.json", "keyring.json")
PERMISSIONS_FILE = "permissions.json"

# Letters, digits, ``.``, ``_``, ``-`` in ``/``-separated segments. Keeping ``*?[]`` out of
# identities means a sender can never smuggle a pattern, and logs stay one line.
_IDENTITY = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}(?:/[A-Za-z0-9][A-Za-z0-9._-]{0,127}){0,7}"
)

_EVERYONE = ["client/*", "host/*", "coordinator"]

#: The policy used when a key directory has no ``permissions.json``.
DEFAULT_PERMISSIONS: dict[str, list[str]] = {
    # the public contract: only configured clients start or stop migrations
    "MigrateRequest": ["client/*", "coordinator"],
    "MigrationCancel": ["client/*"],
    # read-only queries the CLI makes
    "ListMigrations": ["client/*"],
    "GetTrace": ["client/*"],
    "Inspect": _EVERYONE,
    "HealthCheck": _EVERYONE,
    # provisioning and event injection the CLI does (ferry_cli.client): every client is an
    # operator by default; narrow these to e.g. "client/ops-*" in permissions.json
    "CreateVm": _EVERYONE,
    "RegisterManagementGraph": _EVERYONE,
    "ActivateVmEvents": _EVERYONE,
    "SetAttributes": _EVERYONE,
    "VmEvent": _EVERYONE,
    "VmEventBatch": _EVERYONE,
    # everything else is service-to-service traffic
    "*": ["host/*", "coordinator"],
}

#: Public messages may arrive without an AMQP ``type``; the router then types them by
#: routing key. Permissions must judge the type the handler will see, not the empty one.
DEFAULT_ROUTE_TYPES: dict[str, str] = {
    MIGRATION_REQUESTED: "MigrateRequest",
    MIGRATION_CANCEL: "MigrationCancel",
    "vm.*.event": "VmEvent",
    "inventory.*": "HostInventory",
    "alarm.*": "Alarm",
}


# ---- identities and patterns -----------------------------------------------------------


def valid_identity(identity: str) -> bool:
    """Whether ``identity`` is well formed (``coordinator``, ``host/host-a/sensor``, ...)."""
    return _IDENTITY.fullmatch(identity) is not None


def _compile(pattern: str) -> re.Pattern[str]:
    # fnmatchcase semantics (``*`` also crosses ``/``), compiled once instead of per message
    return re.compile(translate(pattern))


class _Patterns:
    """A set of fnmatch patterns, matched case-sensitively."""

    __slots__ = ("patterns", "_compiled")

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(patterns)
        self._compiled = tuple(_compile(p) for p in self.patterns)

    def match(self, name: str) -> bool:
        return any(c.match(name) for c in self._compiled)


# ---- permissions -----------------------------------------------------------------------


class Permissions:
    """Which identities may send which message types.

    Built from a mapping of message type to identity patterns (``fnmatch`` syntax)::

        {"MigrateRequest": ["client/*", "coordinator"],
         "MigrationCancel": ["client/*"],
         "*": ["host/*", "coordinator"]}

    A type with its own entry is governed by that entry only (so ``*`` does not let hosts
    send ``MigrationCancel``); other types fall back to ``*``; without ``*`` they are
    denied. A message without an AMQP type takes the type its routing key implies
    (``route_types``, fnmatch on the routing key), as the router does; an untyped message
    on any other routing key is denied.
    """

    def __init__(
        self,
        rules: Mapping[str, Sequence[str]],
        *,
        route_types: Mapping[str, str] | None = None,
    ) -> None:
        for type_name, patterns in rules.items():
            if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
                raise ValueError(
                    f"permissions for {type_name!r} must be a list of identity patterns"
                )
        self._rules = {t: _Patterns(p) for t, p in rules.items() if t != "*"}
        self._default = _Patterns(rules["*"]) if "*" in rules else None
        routes = DEFAULT_ROUTE_TYPES if route_types is None else route_types
        self._routes = tuple((_compile(k), v) for k, v in routes.items())
        # decisions are asked about authenticated senders only, so this stays small
        self._cache: dict[tuple[str, str], bool] = {}

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Sequence[str]]) -> Permissions:
        """Build from a plain mapping, as read from ``permissions.json``."""
        return cls(mapping)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Permissions:
        """Read a JSON object of message type to list of identity patterns."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of type -> [identity patterns]")
        return cls(data)

    def effective_type(self, message: Message) -> str:
        """The type the handler will see: the AMQP type, else the one the routing key implies."""
        if message.type:
            return message.type
        for pattern, type_name in self._routes:
            if pattern.match(message.routing_key):
                return type_name
        return ""

    def allows(self, identity: str, type_name: str) -> bool:
        """Whether ``identity`` may send messages of ``type_name``."""
        key = (identity, type_name)
        decision = self._cache.get(key)
        if decision is None:
            rule = self._rules.get(type_name, self._default) if type_name else None
            decision = rule is not None and rule.match(identity)
            if len(self._cache) >= 4096:
                self._cache.clear()
            self._cache[key] = decision
        return decision


# ---- keys --------------------------------------------------------------------------------


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: 16 hex digits of sha256 over its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


PublicKeys = Ed25519PublicKey | Sequence[Ed25519PublicKey]


@dataclass(frozen=True, slots=True)
class _TrustedKey:
    key: Ed25519PublicKey
    patterns: _Patterns


def _trust_table(trusted: Mapping[str, PublicKeys]) -> dict[str, _TrustedKey]:
    """Invert pattern -> keys into key id -> (key, patterns it may sign for)."""
    by_id: dict[str, tuple[Ed25519PublicKey, list[str]]] = {}
    for pattern, keys in trusted.items():
        for key in [keys] if isinstance(keys, Ed25519PublicKey) else keys:
            kid = key_id(key)
            by_id.setdefault(kid, (key, []))[1].append(pattern)
    return {kid: _TrustedKey(key, _Patterns(p)) for kid, (key, p) in by_id.items()}


# ---- canonical form ----------------------------------------------------------------------

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


# ---- the authenticator -------------------------------------------------------------------


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
        self._trusted = _trust_table(_merge(trusted, {identity: self.public_key}))
        self._known_senders = _Patterns(
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


# ---- key files ----------------------------------------------------------------------------


@dataclass
class Keyring:
    """What a key directory holds.

    ``private_keys`` and ``public_keys`` are by file stem (``host-a.key`` -> ``host-a``);
    ``trusted`` maps identity patterns to keys, from ``trust.json``; ``permissions`` comes
    from ``permissions.json`` if there is one.
    """

    directory: Path
    private_keys: dict[str, Ed25519PrivateKey] = field(default_factory=dict)
    public_keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    trusted: dict[str, list[Ed25519PublicKey]] = field(default_factory=dict)
    permissions: Permissions | None = None

    def private_key(self, name: str | None = None) -> Ed25519PrivateKey:
        """The private key called ``name``, or the only one there is."""
        if name is not None:
            try:
                return self.private_keys[name]
            except KeyError:
                raise LookupError(f"no private key {name}.key in {self.directory}") from None
        if len(self.private_keys) != 1:
            found = ", ".join(sorted(self.private_keys)) or "none"
            raise LookupError(
                f"{self.directory}: need exactly one private key or FERRY_KEY_NAME (found {found})"
            )
        return next(iter(self.private_keys.values()))

    def key_for(self, identity: str) -> Ed25519PrivateKey:
        """The private key that ``trust.json`` lets sign as ``identity``, else the only one.

        A directory holding several private keys (the single-process demo) needs no
        ``FERRY_KEY_NAME``: ``host/host-a/sensor`` gets the key trusted for ``host/host-a/*``.
        """
        table = _trust_table(self.trusted)
        fits = [
            k
            for k in self.private_keys.values()
            if (t := table.get(key_id(k.public_key()))) is not None and t.patterns.match(identity)
        ]
        if len(fits) == 1:
            return fits[0]
        if len(fits) > 1:
            raise LookupError(f"{self.directory}: several private keys may sign as {identity}")
        return self.private_key()


def generate_keypair(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write a new ``<name>.key`` (PKCS#8 PEM, mode 0600) and ``<name>.pub`` into ``directory``.

    Refuses to overwrite an existing private key: replacing a key is a rotation, to be
    done on purpose (see ``docs/security.md``).
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(f"key name {name!r} must be a plain file name")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_path, public_path = d / f"{name}.key", d / f"{name}.pub"
    # created 0600 from the start: a chmod afterwards would leave a window where it is readable
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read an unencrypted PEM Ed25519 private key, warning if others can read the file."""
    p = Path(path)
    mode = p.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        # Kubernetes mounts Secrets 0644 unless defaultMode says otherwise
        log.warning("private key %s is readable by group/others (mode %o)", p, stat.S_IMODE(mode))
    key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{p} is not an Ed25519 private key")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Read a PEM (SubjectPublicKeyInfo) Ed25519 public key."""
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


def load_keyring(directory: str | os.PathLike[str]) -> Keyring:
    """Load ``*.key``, ``*.pub``, ``trust.json`` (or ``keyring.json``) and ``permissions.json``.

    ``trust.json`` maps identity patterns to public key files, relative to the directory::

        {"coordinator": "coordinator.pub",
         "host/host-a/*": "host-a.pub",
         "client/ops-alice": ["ops-alice.pub", "ops-alice-2026.pub"]}

    Hidden entries are skipped: a Kubernetes Secret mount has ``..data`` and friends.
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"key directory {d} does not exist")
    ring = Keyring(directory=d)
    for path in sorted(d.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix == ".key":
            ring.private_keys[path.stem] = load_private_key(path)
        elif path.suffix == ".pub":
            ring.public_keys[path.stem] = load_public_key(path)
    trust_path = next((d / n for n in TRUST_FILES if (d / n).is_file()), None)
    if trust_path is not None:
        data = json.loads(trust_path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(
                f"{trust_path}: expected a JSON object of identity pattern -> key file(s)"
            )
        for pattern, files in data.items():
            names = [files] if isinstance(files, str) else files
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(
                    f"{trust_path}: {pattern!r} must map to a key file or a list of them"
                )
            ring.trusted[pattern] = [_public_from(d, ring, n) for n in names]
    perm_path = d / PERMISSIONS_FILE
    if perm_path.is_file():
        ring.permissions = Permissions.from_file(perm_path)
    return ring


def _public_from(directory: Path, ring: Keyring, name: str) -> Ed25519PublicKey:
    stem = name[:-4] if name.endswith(".pub") else name
    if stem in ring.public_keys and "/" not in name:
        return ring.public_keys[stem]
    return load_public_key(directory / name)


# ---- from the environment -------------------------------------------------------------------


def authenticator_from_env(
    *, clock: Clock | None = None, environ: Mapping[str, str] | None = None
) -> Authenticator:
    """Build the service's authenticator from environment variables.

    ``FERRY_AUTH``
        ``ed25519`` to sign and verify; ``none`` or unset for :class:`NoAuth`.
    ``FERRY_KEYS_DIR``
        the key directory (:func:`load_keyring`); required with ``ed25519``.
    ``FERRY_IDENTITY``
        this service's identity, e.g. ``host/host-a/sensor``; required with ``ed25519``.
    ``FERRY_KEY_NAME``
        which ``<name>.key`` to sign with; by default the one ``trust.json`` trusts for
        ``FERRY_IDENTITY``, or the only one in the directory.
    ``FERRY_PERMISSIONS_FILE``
        a permissions JSON file; default ``$FERRY_KEYS_DIR/permissions.json``, else
        :data:`DEFAULT_PERMISSIONS`.
    ``FERRY_AUTH_MAX_AGE_S``, ``FERRY_AUTH_MAX_SKEW_S``, ``FERRY_AUTH_REPLAY_WINDOW``
        override the staleness and replay limits (300, 30, 100000).
    """
    env = os.environ if environ is None else environ
    identity = env.get("FERRY_IDENTITY")
    factory = auth_factory_from_env(clock=clock, environ=env)
    if isinstance(factory, _NoAuthFactory):
        return NoAuth()
    if not identity:
        raise ValueError("FERRY_AUTH=ed25519 needs FERRY_IDENTITY")
    return factory(identity)


class _NoAuthFactory:
    def __call__(self, identity: str) -> Authenticator:
        return NoAuth()


def auth_factory_from_env(
    *, clock: Clock | None = None, environ: Mapping[str, str] | None = None
) -> Callable[[str], Authenticator]:
    """Like :func:`authenticator_from_env`, for a process hosting several identities.

    Loads the key directory once and returns ``identity -> authenticator`` (each with its
    own replay window), choosing each identity's key through ``trust.json``. This is what
    ``ferry_cli.cluster``'s ``auth=`` factory wants. ``FERRY_IDENTITY`` is not needed.
    """
    env = os.environ if environ is None else environ
    mode = env.get("FERRY_AUTH", "").strip().lower()
    if mode in ("", "none"):
        if not mode:
            log.warning("FERRY_AUTH is not set: messages are neither signed nor verified")
        return _NoAuthFactory()
    if mode != "ed25519":
        raise ValueError(f"FERRY_AUTH={mode!r}: expected 'ed25519' or 'none'")
    keys_dir = env.get("FERRY_KEYS_DIR")
    if not keys_dir:
        raise ValueError("FERRY_AUTH=ed25519 needs FERRY_KEYS_DIR")
    ring = load_keyring(keys_dir)
    key_name = env.get("FERRY_KEY_NAME")
    permissions = ring.permissions
    if env.get("FERRY_PERMISSIONS_FILE"):
        permissions = Permissions.from_file(env["FERRY_PERMISSIONS_FILE"])
    if permissions is None:
        permissions = Permissions(DEFAULT_PERMISSIONS)
    if not ring.trusted:
        log.warning("%s has no trust.json: a service will trust only itself", keys_dir)
    max_age = float(env.get("FERRY_AUTH_MAX_AGE_S", "300"))
    max_skew = float(env.get("FERRY_AUTH_MAX_SKEW_S", "30"))
    window = int(env.get("FERRY_AUTH_REPLAY_WINDOW", "100000"))

    def build(identity: str) -> Authenticator:
        return Ed25519Authenticator(
            identity,
            ring.private_key(key_name) if key_name else ring.key_for(identity),
            ring.trusted,
            clock=clock,
            max_age_s=max_age,
            max_skew_s=max_skew,
            replay_window=window,
            permissions=permissions,
        )

    return build


def init_keydir(
    directory: str | os.PathLike[str],
    hosts: Iterable[str],
    clients: Iterable[str] = (),
) -> Path:
    """Create a complete key directory: keys, ``trust.json`` and ``permissions.json``.

    One key for the coordinator, one per host (trusted for ``host/<host>/*``) and one per
    client (trusted for ``client/<name>`` only). Good for the demo and as a template; in
    production each host's Secret holds only its own ``.key`` plus the public files.
    """
    d = Path(directory)
    trust: dict[str, str] = {}
    for name, pattern in (
        [("coordinator", "coordinator")]
        + [(h, f"host/{h}/*") for h in hosts]
        + [(f"client-{c}", f"client/{c}") for c in clients]
    ):
        if not valid_identity(pattern.removesuffix("/*")):
            raise ValueError(f"bad host or client name in {pattern!r}")
        generate_keypair(d, name)
        trust[pattern] = f"{name}.pub"
    (d / "trust.json").write_text(json.dumps(trust, indent=2) + "\n", encoding="utf-8")
    (d / PERMISSIONS_FILE).write_text(
        json.dumps(DEFAULT_PERMISSIONS, indent=2) + "\n", encoding="utf-8"
    )
    return d


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ferry_common.signing init DIR --host host-a --client ops-alice`` and ``keygen DIR NAME``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ferry_common.signing")
    sub = parser.add_subparsers(dest="cmd", required=True)
    init = sub.add_parser("init", help="create keys, trust.json and permissions.json")
    init.add_argument("directory")
    init.add_argument("--host", action="append", default=[])
    init.add_argument("--client", action="append", default=[])
    keygen = sub.add_parser("keygen", help="write <name>.key (0600) and <name>.pub")
    keygen.add_argument("directory")
    keygen.add_argument("name")
    args = parser.parse_args(argv)
    if args.cmd == "init":
        print(init_keydir(args.directory, args.host, args.client))
    else:
        for path in generate_keypair(args.directory, args.name):
            print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
