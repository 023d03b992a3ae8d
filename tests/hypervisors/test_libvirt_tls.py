"""The libvirt driver's migration stream over mutual TLS (``tls``), between two real daemons
configured with the fleet's certificates and ``migrate_tls_force`` (``scripts/libvirt-daemons.sh``
with ``FERRY_LIBVIRT_TLS_DIR``): a TLS migration moves the guest; one in clear text is refused
and the guest keeps running on the source.

These daemons are their own (hosts ``ta`` and ``tb``, their own state and ports), so the
other libvirt tests' daemons keep their configuration.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.pki import new_ca, qemu_x509_dir

from .conftest import DAEMONS, Pair, _importable, require

pytestmark = pytest.mark.libvirt


@pytest.fixture(scope="module")
def tls_daemons() -> Iterator[dict[str, str]]:
    """Two libvirt daemons that migrate only over TLS, each with a certificate of one CA."""
    require("libvirtd", shutil.which("libvirtd") is not None)
    require("libvirt-python (pip)", _importable("libvirt"))
    base = Path(tempfile.mkdtemp(prefix="flt-", dir="/tmp"))  # short: unix socket paths
    ca, issuer = new_ca("fleet CA")
    for host in ("ta", "tb"):
        qemu_x509_dir(base / "tls" / host, ca, issuer, host)
    env = {**os.environ, "FERRY_LIBVIRT_STATE": str(base / "state"), "FERRY_LIBVIRT_TLS_DIR": str(base / "tls"),
           "FERRY_LIBVIRT_PORT_BASE": "49552"}
    started = subprocess.run([DAEMONS, "start", "ta", "tb"], env=env, capture_output=True, text=True)
    try:
        if started.returncode != 0:
            pytest.fail(f"libvirt daemons did not start:\n{started.stdout}\n{started.stderr}")
        yield {h: subprocess.run([DAEMONS, "uri", h], env=env, capture_output=True, text=True,
                                 check=True).stdout.strip() for h in ("ta", "tb")}
    finally:
        subprocess.run([DAEMONS, "stop", "ta", "tb"], env=env, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def drivers(guest_image: Path, tls_daemons: dict[str, str]) -> AsyncIterator[dict[bool, Pair]]:
    """A source and a target driver on those daemons, with and without ``tls``."""
    from ferry_hypervisor_adapter.drivers.libvirt import LibvirtDriver

    base = Path(tempfile.mkdtemp(prefix="fltd-", dir="/tmp"))
    pairs: dict[bool, Pair] = {}
    for tls in (True, False):
        pairs[tls] = Pair(
            LibvirtDriver("host-a", uri=tls_daemons["ta"], run_dir=base / f"a{tls}", guest_image=guest_image, tls=tls),
            LibvirtDriver("host-b", uri=tls_daemons["tb"], run_dir=base / f"b{tls}", guest_image=guest_image, tls=tls),
            lambda vm_id: None, "libvirt",
        )
        await pairs[tls].source.start()
        await pairs[tls].target.start()
    yield pairs
    for pair in pairs.values():
        await pair.teardown()
    shutil.rmtree(base, ignore_errors=True)


async def test_the_guest_moves_over_tls_between_the_daemons(drivers: dict[bool, Pair]) -> None:
    pair = drivers[True]
    vm_id, result = await pair.migrate_new_guest()
    assert result.outcome == "completed", result
    assert await pair.target.finish_incoming(vm_id)
    assert await pair.advancing(pair.target, vm_id), "guest does not run on the target"
    assert await pair.source.state(vm_id) == "absent"  # peer to peer: libvirt ended the source


async def test_a_migration_in_clear_text_is_refused_and_the_guest_stays(drivers: dict[bool, Pair]) -> None:
    pair = drivers[False]
    vm_id, result = await pair.migrate_new_guest()
    assert result.outcome == "failed" and "TLS" in (result.reason or ""), result
    assert await pair.source.state(vm_id) == "running"
    assert await pair.advancing(pair.source, vm_id), "the source guest stopped"
    await pair.target.abort_incoming(vm_id)
    assert await pair.target.state(vm_id) == "absent"
