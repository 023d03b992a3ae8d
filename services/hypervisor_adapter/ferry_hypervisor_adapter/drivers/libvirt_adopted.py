"""The libvirt driver's side of adopted domains: adopt, release, list what can be adopted,
check an incoming one at admission, and the target's disks of a copy-mode migration.

A mixin of :class:`~.libvirt.LibvirtDriver`; the work is in :mod:`.libvirt_domains` and
:mod:`.libvirt_storage`. The disks a target created for a migration are remembered beside its
marker file (``NAME.disks``), so a rollback deletes them and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ferry_common.messages.commands import Refusal
from ferry_common.messages.domain import VmSpec
from ferry_common.messages.public import AdoptableVm

from . import libvirt_domains, libvirt_storage

T = TypeVar("T")


class AdoptedDomains:
    """Adopted persistent domains (see :mod:`.libvirt_domains`)."""

    run_dir: Path

    def _connection(self) -> Any:
        raise NotImplementedError

    def _marker(self, vm_id: str) -> Path:
        raise NotImplementedError

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        from .libvirt_calls import _blocking  # the driver's own threads

        return await _blocking(fn, *args)

    async def adopt(self, ref: str, storage: str = libvirt_domains.DEFAULT_STORAGE) -> tuple[VmSpec, bool]:
        """Take the defined domain ``ref`` (name or UUID) under management: its spec, and
        whether it was adopted already. :class:`~.libvirt_domains.AdoptionError` says why not."""
        return await self._run(libvirt_domains.adopt, self._connection(), ref, storage)

    async def release(self, vm_id: str) -> bool:
        """Give an adopted domain back (it runs on, defined); False if it was not adopted."""
        return await self._run(libvirt_domains.release, self._connection(), vm_id)

    async def adoptable(self) -> list[AdoptableVm]:
        return await self._run(libvirt_domains.adoptable, self._connection())

    async def check_incoming(self, spec: VmSpec) -> list[Refusal]:
        """Why ``spec`` cannot come here (admission); empty if it can. Only adopted domains
        bring disks, host devices and CPU models of their own."""
        if not spec.params.get("adopted"):
            return []
        return await self._run(libvirt_domains.refusals, self._connection(), spec)

    # --- the target's disks in copy mode ----------------------------------------------
    def _disks_file(self, vm_id: str) -> Path:
        return self._marker(vm_id).with_suffix(".disks")

    async def _precreate_disks(self, spec: VmSpec) -> None:
        if not spec.params.get("adopted") or spec.params.get("storage") != "copy":
            return
        created = await self._run(libvirt_storage.precreate, self._connection(), list(spec.params.get("disks") or []))
        record = self._disks_file(spec.vm_id)
        known = json.loads(record.read_text()) if record.exists() else []
        record.write_text(json.dumps(sorted({*known, *created})))

    async def _remove_disks(self, vm_id: str) -> None:
        """A migration that did not complete: the disks made for it go."""
        record = self._disks_file(vm_id)
        if record.exists():
            await self._run(libvirt_storage.remove, self._connection(), json.loads(record.read_text()))
            record.unlink(missing_ok=True)

    def _keep_disks(self, vm_id: str) -> None:
        """The guest runs here: its disks are its own now."""
        self._disks_file(vm_id).unlink(missing_ok=True)
