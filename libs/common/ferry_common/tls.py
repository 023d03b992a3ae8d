"""TLS to the broker, configured by ``FERRY_AMQP_*`` (fields of :class:`ferry_common.settings.Settings`).

``AMQP_URL=amqps://...`` alone verifies the broker against the system's CAs. A private CA,
and a client certificate for mutual TLS, come from files (in Kubernetes, a Secret mounted
as a volume):

- ``FERRY_AMQP_CA_FILE``: PEM bundle the broker's certificate must chain to;
- ``FERRY_AMQP_CERT_FILE`` and ``FERRY_AMQP_KEY_FILE``: this service's certificate and key.

The broker's hostname (the URL's host) is always verified; there is no switch to turn verification off.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["TlsSettings", "tls_context"]


@dataclass(frozen=True)
class TlsSettings:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TlsSettings:
        """From a mapping of ``FERRY_AMQP_*`` variables (services get theirs from Settings)."""
        e = env
        return cls(
            ca_file=e.get("FERRY_AMQP_CA_FILE") or None,
            cert_file=e.get("FERRY_AMQP_CERT_FILE") or None,
            key_file=e.get("FERRY_AMQP_KEY_FILE") or None,
        )

    @property
    def configured(self) -> bool:
        return any((self.ca_file, self.cert_file, self.key_file))


def tls_context(url: str, tls: TlsSettings) -> ssl.SSLContext | None:
    """The context for connecting to ``url``, or None when it is plain AMQP.

    Raises ``ValueError`` for a configuration that cannot be right (TLS files for an
    ``amqp://`` URL, a certificate without its key), so a service refuses to start rather
    than talk in clear text or fail later.
    """
    scheme = urlsplit(url).scheme
    if scheme != "amqps":
        if tls.configured:
            raise ValueError("FERRY_AMQP_* TLS files are set but AMQP_URL is not amqps://")
        return None
    if bool(tls.cert_file) != bool(tls.key_file):
        raise ValueError("FERRY_AMQP_CERT_FILE and FERRY_AMQP_KEY_FILE go together")
    ctx = ssl.create_default_context(cafile=tls.ca_file)  # verifies the chain and hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert_file and tls.key_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    return ctx
