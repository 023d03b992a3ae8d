"""Key files: Ed25519 key pairs, key directories (``trust.json``, ``permissions.json``)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .permissions import DEFAULT_PERMISSIONS, Patterns, Permissions, valid_identity

log = logging.getLogger("ferry_common.signing")

#: Files in a key directory.
TRUST_FILES = ("trust.json", "keyring.json")
PERMISSIONS_FILE = "permissions.json"

def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: 16 hex digits of sha256 over its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


PublicKeys = Ed25519PublicKey | Sequence[Ed25519PublicKey]


@dataclass(frozen=True, slots=True)
class TrustedKey:
    key: Ed25519PublicKey
    patterns: Patterns


def trust_table(trusted: Mapping[str, PublicKeys]) -> dict[str, TrustedKey]:
    """Invert pattern -> keys into key id -> (key, patterns it may sign for)."""
    by_id: dict[str, tuple[Ed25519PublicKey, list[str]]] = {}
    for pattern, keys in trusted.items():
        for key in [keys] if isinstance(keys, Ed25519PublicKey) else keys:
            kid = key_id(key)
            by_id.setdefault(kid, (key, []))[1].append(pattern)
    return {kid: TrustedKey(key, Patterns(p)) for kid, (key, p) in by_id.items()}



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
        table = trust_table(self.trusted)
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

