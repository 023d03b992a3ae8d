"""The QEMU driver's migration stream over mutual TLS (``tls_dir``), between real QEMU processes.

Both hosts hold a certificate of the fleet's CA: the guest moves, and runs on the target. A
stream in clear text, or a certificate of another CA on either end, is refused, and the guest
keeps running on the source.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509

from ferry_hypervisor_adapter.drivers.qemu import QemuDriver, _read_pid
from tests.pki import cert_pem, new_ca, qemu_x509_dir

from .conftest import Pair, require_qemu, short_dir

pytestmark = pytest.mark.qemu


@pytest.fixture
async def base(guest_image: Path) -> AsyncIterator[Path]:
    require_qemu()
    d = short_dir("ft-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def _pair(base: Path, guest_image: Path, source_tls: Path | None, target_tls: Path | None) -> Pair:
    source = QemuDriver("host-a", run_dir=base / "a", guest_image=guest_image, tls_dir=source_tls)
    target = QemuDriver("host-b", run_dir=base / "b", guest_image=guest_image, tls_dir=target_tls)
    await source.start()
    await target.start()
    return Pair(source, target, lambda vm_id: None, "qemu")


async def _assert_refused(base: Path, guest_image: Path, source_tls: Path | None, target_tls: Path) -> None:
    """A migration between drivers with these credentials fails, and the guest stays on the source."""
    pair = await _pair(base, guest_image, source_tls, target_tls)
    try:
        vm_id, result = await pair.migrate_new_guest()
        assert result.outcome == "failed", result
        assert await pair.source.state(vm_id) == "running"
        assert await pair.advancing(pair.source, vm_id), "the source guest stopped"
        await pair.target.abort_incoming(vm_id)
        assert await pair.target.state(vm_id) == "absent"
    finally:
        await pair.teardown()


def _certified_by_another_ca(d: Path, host: str, fleet_ca: x509.Certificate) -> Path:
    """Credentials for ``host`` from another CA that also trust the fleet's CA (QEMU checks its
    own certificate against its CA file at start): only the other end's check can refuse it."""
    rogue, rogue_issuer = new_ca("another CA")
    qemu_x509_dir(d, rogue, rogue_issuer, host)
    (d / "ca-cert.pem").write_bytes(cert_pem(rogue) + cert_pem(fleet_ca))
    return d


async def test_the_guest_moves_over_tls_between_hosts_of_one_fleet(base: Path, guest_image: Path) -> None:
    ca, issuer = new_ca("fleet CA")
    pair = await _pair(base, guest_image, qemu_x509_dir(base / "tls-a", ca, issuer, "host-a"),
                       qemu_x509_dir(base / "tls-b", ca, issuer, "host-b"))
    try:
        vm_id, result = await pair.migrate_new_guest()
        assert result.outcome == "completed", result
        assert await pair.target.finish_incoming(vm_id)
        assert await pair.advancing(pair.target, vm_id), "guest does not run on the target"
        assert await pair.source.state(vm_id) == "postmigrate"
        params = await pair.target.qmp(vm_id, "query-migrate-parameters")
        assert params["tls-creds"] == "ferry-tls-in"  # the target took the stream over TLS
    finally:
        await pair.teardown()


async def test_a_ready_receiving_process_takes_the_stream_over_tls(base: Path, guest_image: Path) -> None:
    ca, issuer = new_ca("fleet CA")
    source = QemuDriver("host-a", run_dir=base / "a", guest_image=guest_image,
                        tls_dir=qemu_x509_dir(base / "tls-a", ca, issuer, "host-a"))
    target = QemuDriver("host-b", run_dir=base / "b", guest_image=guest_image, standby="128",
                        tls_dir=qemu_x509_dir(base / "tls-b", ca, issuer, "host-b"))
    await source.start()
    await target.start()
    pair = Pair(source, target, lambda vm_id: None, "qemu")
    try:
        for _ in range(500):
            if target.standby.names():
                break
            await asyncio.sleep(0.02)
        (standby,) = target.standby.names()
        standby_pid = _read_pid(target.run_dir / ".standby" / standby)
        vm_id, result = await pair.migrate_new_guest()
        assert result.outcome == "completed", result
        assert standby_pid is not None and target.pid(vm_id) == standby_pid  # landed in the ready one
        assert await target.finish_incoming(vm_id)
        assert await pair.advancing(target, vm_id), "guest does not run on the target"
    finally:
        await pair.teardown()


async def test_a_target_that_requires_tls_refuses_a_stream_in_clear(base: Path, guest_image: Path) -> None:
    ca, issuer = new_ca("fleet CA")
    await _assert_refused(base, guest_image, None, qemu_x509_dir(base / "tls-b", ca, issuer, "host-b"))


async def test_a_target_refuses_a_source_whose_certificate_another_ca_signed(base: Path, guest_image: Path) -> None:
    ca, issuer = new_ca("fleet CA")
    await _assert_refused(base, guest_image, _certified_by_another_ca(base / "tls-a", "host-a", ca),
                          qemu_x509_dir(base / "tls-b", ca, issuer, "host-b"))


async def test_a_source_refuses_a_target_whose_certificate_another_ca_signed(base: Path, guest_image: Path) -> None:
    ca, issuer = new_ca("fleet CA")
    await _assert_refused(base, guest_image, qemu_x509_dir(base / "tls-a", ca, issuer, "host-a"),
                          _certified_by_another_ca(base / "tls-b", "host-b", ca))


async def test_a_driver_without_its_credentials_does_not_start(base: Path, guest_image: Path) -> None:
    (base / "empty").mkdir()
    driver = QemuDriver("host-a", run_dir=base / "a", guest_image=guest_image, tls_dir=base / "empty")
    with pytest.raises(RuntimeError, match="ca-cert.pem, server-cert.pem"):
        await driver.start()
