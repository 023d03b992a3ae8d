"""The service's authenticator, built from its settings (``FERRY_AUTH`` and friends), or from a
mapping of those variables (tests)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from ..clock import Clock
from ..security import Authenticator, NoAuth
from ..settings import Settings
from .authenticator import Ed25519Authenticator
from .keys import load_keyring
from .permissions import DEFAULT_PERMISSIONS, Permissions

log = logging.getLogger("ferry_common.signing")


def _variables(environ: Mapping[str, str] | None, settings: Settings | None) -> Mapping[str, str]:
    if environ is not None:
        return environ
    if settings is None:
        raise TypeError("pass settings= (or environ=, a mapping of the variables below)")
    return settings.signing_env()


def authenticator_from_env(
    *, clock: Clock | None = None, environ: Mapping[str, str] | None = None, settings: Settings | None = None
) -> Authenticator:
    """Build the service's authenticator from its settings, or from ``environ`` (a mapping of
    these variables; the process environment is not read here):

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
    env = _variables(environ, settings)
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
    *, clock: Clock | None = None, environ: Mapping[str, str] | None = None, settings: Settings | None = None
) -> Callable[[str], Authenticator]:
    """Like :func:`authenticator_from_env`, for a process hosting several identities.

    Loads the key directory once and returns ``identity -> authenticator`` (each with its
    own replay window), choosing each identity's key through ``trust.json``. This is what
    ``ferry_cli.cluster``'s ``auth=`` factory wants. ``FERRY_IDENTITY`` is not needed.
    """
    env = _variables(environ, settings)
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


