"""A throwaway private CA for the tests that check TLS (to the broker, between QEMU processes)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Issuer = tuple[x509.Name, ec.EllipticCurvePrivateKey]


def issue(name: str, key: ec.EllipticCurvePrivateKey, issuer: Issuer | None, *, ca: bool = False,
          server: bool = False, usages: tuple[x509.ObjectIdentifier, ...] = ()) -> x509.Certificate:
    """A certificate for ``name`` valid for a day; self-signed without ``issuer``. ``server``
    adds ``localhost`` and ``127.0.0.1`` as its names; ``usages`` its extended key usages."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                          crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    if usages:
        b = b.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def new_ca(name: str) -> tuple[x509.Certificate, Issuer]:
    """A CA certificate and what :func:`issue` needs to sign with it."""
    key = new_key()
    cert = issue(name, key, None, ca=True)
    return cert, (cert.subject, key)


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def qemu_x509_dir(d: Path, ca: x509.Certificate, issuer: Issuer, host: str) -> Path:
    """QEMU's x509 credentials directory for ``host``: the CA, and one certificate (for
    localhost and 127.0.0.1, server and client usage) as both its server and client pair."""
    d.mkdir(parents=True, exist_ok=True)
    key = new_key()
    cert = issue(host, key, issuer, server=True,
                 usages=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH))
    (d / "ca-cert.pem").write_bytes(cert_pem(ca))
    for end in ("server", "client"):
        (d / f"{end}-cert.pem").write_bytes(cert_pem(cert))
        (d / f"{end}-key.pem").write_bytes(key_pem(key))
    return d
