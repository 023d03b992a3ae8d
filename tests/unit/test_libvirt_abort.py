"""The libvirt driver's abort of a migration job is bounded and escalates: ``abortJob`` was
seen to block while the job went on, so QEMU's ``migrate_cancel`` and ``abortJob`` follow."""

from __future__ import annotations

from typing import Any

import pytest

libvirt_qemu = pytest.importorskip("libvirt_qemu")

from ferry_hypervisor_adapter.drivers.libvirt import LibvirtDriver  # noqa: E402


class StubbornDomain:
    """A domain whose migration job ignores ``abortJob``; ``migrate_cancel`` stops it if
    ``cancellable``."""

    def __init__(self, cancellable: bool) -> None:
        self.cancellable = cancellable
        self.running = True
        self.aborts = 0
        self.cancels = 0

    def abortJob(self) -> int:  # noqa: N802 - libvirt's name
        self.aborts += 1
        return 0

    def jobStats(self) -> dict[str, Any]:  # noqa: N802
        return {"type": 2 if self.running else 0}


@pytest.fixture
def driver(monkeypatch: pytest.MonkeyPatch) -> LibvirtDriver:
    def monitor(dom: StubbornDomain, command: str, flags: int) -> str:
        assert command == '{"execute":"migrate_cancel"}'
        dom.cancels += 1
        if dom.cancellable:
            dom.running = False
        return "{}"

    monkeypatch.setattr(libvirt_qemu, "qemuMonitorCommand", monitor)
    return LibvirtDriver("host-a", abort_grace_s=0.01)


async def test_a_job_that_ignores_abort_is_cancelled_in_qemu(driver: LibvirtDriver) -> None:
    dom = StubbornDomain(cancellable=True)
    assert await driver._abort("vm1", dom) is True
    assert (dom.aborts, dom.cancels, dom.running) == (1, 1, False)


async def test_a_job_that_cannot_be_stopped_is_given_up_on(driver: LibvirtDriver) -> None:
    dom = StubbornDomain(cancellable=False)
    assert await driver._abort("vm1", dom) is False
    assert (dom.aborts, dom.cancels, dom.running) == (3, 2, True)  # they took turns
