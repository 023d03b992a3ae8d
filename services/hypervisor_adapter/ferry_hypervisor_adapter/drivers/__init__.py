"""Hypervisor drivers: ``sim`` (simulated), ``qemu`` (QMP) and ``libvirt``."""

from __future__ import annotations

from typing import Any

from .base import Driver, MigrationParams, MigrationProgress, MigrationResult


def load_driver(name: str, host: str, **options: Any) -> Driver:
    """Build the driver called ``name`` for ``host``; imports real drivers only when asked."""
    if name == "sim":
        from .sim import SimDriver

        return SimDriver(host, **options)
    if name == "qemu":
        from .qemu import QemuDriver  # type: ignore[import-not-found]

        return QemuDriver(host, **options)  # type: ignore[no-any-return]
    if name == "libvirt":
        from .libvirt import LibvirtDriver  # type: ignore[import-not-found]

        return LibvirtDriver(host, **options)  # type: ignore[no-any-return]
    raise ValueError(f"unknown hypervisor driver {name!r} (sim, qemu, libvirt)")


__all__ = ["Driver", "MigrationParams", "MigrationProgress", "MigrationResult", "load_driver"]
