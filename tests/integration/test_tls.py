"""TLS to the broker, end to end: a TLS-terminating proxy in front of the real RabbitMQ,
with its own CA, asks for a client certificate. A service configured through
``FERRY_AMQP_*`` connects and exchanges messages; one that trusts only the system CAs, or
has no client certificate, cannot connect."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from ferry_common.bus.amqp import AmqpBus
from ferry_common.bus.interfaces import Delivery, Message, QueueSpec
from ferry_common.errors import Transient
from ferry_common.tls import TlsSettings, tls_context
from tests.harness import drop_vhost, make_vhost
from tests.pki import cert_pem, issue, key_pem, new_ca, new_key

pytestmark = pytest.mark.rabbitmq


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> None:
    path.with_suffix(".crt").write_bytes(cert_pem(cert))
    if key is not None:
        path.with_suffix(".key").write_bytes(key_pem(key))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private CA, a server certificate for localhost and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    ca, issuer = new_ca("ferry test CA")
    _write(d / "ca", ca)
    for name, server in (("server", True), ("client", False)):
        key = new_key()
        _write(d / name, issue(f"ferry {name}", key, issuer, server=server), key)
    return d


@dataclass
class TlsProxy:
    port: int
    sessions: int = 0  # TLS handshakes the proxy completed (and forwarded)


@pytest.fixture
async def tls_port(pki: Path, rabbitmq_available: None) -> AsyncIterator[TlsProxy]:
    """A TLS endpoint (client certificate required) that forwards to RabbitMQ on 5672."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(pki / "server.crt", pki / "server.key")

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        with contextlib.suppress(Exception):
            w.close()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        proxy.sessions += 1
        br, bw = await asyncio.open_connection("127.0.0.1", 5672)
        await asyncio.gather(pipe(r, bw), pipe(br, w))

    proxy = TlsProxy(0)
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    proxy.port = server.sockets[0].getsockname()[1]
    yield proxy
    server.close()


@pytest.fixture
def vhost() -> Iterator[str]:
    name = make_vhost()
    yield name
    drop_vhost(name)


def _env(pki: Path, *, ca: bool = True, cert: bool = True) -> dict[str, str]:
    env = {}
    if ca:
        env["FERRY_AMQP_CA_FILE"] = str(pki / "ca.crt")
    if cert:
        env["FERRY_AMQP_CERT_FILE"], env["FERRY_AMQP_KEY_FILE"] = str(pki / "client.crt"), str(pki / "client.key")
    return env


async def test_a_configured_service_talks_over_mutual_tls(pki: Path, tls_port: TlsProxy, vhost: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in _env(pki).items():
        monkeypatch.setenv(k, v)
    bus = AmqpBus.from_env(f"amqps://guest:guest@localhost:{tls_port.port}/{vhost}", name="tls-test")
    assert bus.ssl_context is not None
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def handler(d: Delivery) -> None:
        await d.ack()
        got.put_nowait(d.message.body)

    await asyncio.wait_for(bus.connect(), 20)
    try:
        await bus.consume(QueueSpec("tls.q", ("tls.#",)), handler)
        await bus.publish(Message(routing_key="tls.hello", body=b'{"over":"tls"}'))
        assert await asyncio.wait_for(got.get(), 10) == b'{"over":"tls"}'
        assert tls_port.sessions >= 1
    finally:
        await bus.close()


@pytest.mark.parametrize(("ca", "cert"), [(False, True), (True, False)], ids=["system CAs only", "no client certificate"])
async def test_a_service_that_cannot_verify_or_be_verified_does_not_connect(
        pki: Path, tls_port: TlsProxy, vhost: str, ca: bool, cert: bool) -> None:
    url = f"amqps://guest:guest@localhost:{tls_port.port}/{vhost}"
    bus = AmqpBus(url, ssl_context=tls_context(url, TlsSettings.from_env(_env(pki, ca=ca, cert=cert))), name="tls-test")
    with pytest.raises(Transient) as refused:
        await asyncio.wait_for(bus.connect(), 20)
    await bus.close()
    # refused by the TLS handshake itself, for the reason the case is about
    if not ca:
        assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value), refused.value  # we refused the broker
    assert tls_port.sessions == 0  # and the broker's side never accepted us


def test_tls_settings_that_cannot_be_right_are_refused(pki: Path) -> None:
    with pytest.raises(ValueError, match="not amqps"):
        tls_context("amqp://guest:guest@localhost/", TlsSettings.from_env(_env(pki)))
    with pytest.raises(ValueError, match="go together"):
        tls_context("amqps://localhost/", TlsSettings(cert_file=str(pki / "client.crt")))
    assert tls_context("amqp://localhost/", TlsSettings()) is None
    assert tls_context("amqps://localhost/", TlsSettings()) is not None  # system CAs
